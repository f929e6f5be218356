"""`nvfp4-prep prepare` through the real console script: progress as a bar on a terminal, one line per layer
in a log, one unit (decimal MB) throughout, a summary naming the layout id and the next step; and an output
folder from another run is replaced only with --overwrite."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_prep.contract import layout
from nvfp4_prep.contract.layout import layout_id
from nvfp4_prep.prepared.manifest import Manifest

SCRIPT = Path(sys.executable).with_name("nvfp4-prep")

pytestmark = pytest.mark.skipif(not SCRIPT.exists() and shutil.which("nvfp4-prep") is None,
                                reason="the nvfp4-prep console script is not installed in this environment")


def _script() -> str:
    return str(SCRIPT) if SCRIPT.exists() else str(shutil.which("nvfp4-prep"))


def test_off_a_terminal_each_layer_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    result = subprocess.run([_script(), "prepare", "--backend", "flashinfer_cutlass", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    manifest = Manifest.load(out)
    lines = [line for line in result.stderr.splitlines() if line.startswith("prepare: ")]
    assert len(lines) == len(manifest.layers) == 2
    assert lines[-1].startswith("prepare: model.layers.") and "(2/2 layers, " in lines[-1]
    done, total = lines[-1].rsplit("layers, ", 1)[1].rstrip(")").split(" of ")
    assert done == total and total.endswith(" MB")
    summary = result.stdout.splitlines()
    assert summary[0].endswith(f"layout {layout_id('flashinfer_cutlass')}")
    assert f" in {summary[0].split(' in ')[1].split('s,')[0]}s" in summary[0]
    assert f"{total} in " in summary[0]  # the summary and the lines use the same unit and figure
    assert summary[1].startswith(f"next: nvfp4-prep verify {out} --against ")


def test_on_a_terminal_a_bar_redraws_in_place(tmp_path: Path) -> None:
    parent, child = pty.openpty()
    try:
        process = subprocess.Popen([_script(), "prepare", "--out", str(tmp_path / "prepared")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child)
        os.close(child)
        child = -1
        chunks = []
        while True:
            try:
                data = os.read(parent, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert process.wait(timeout=300) == 0
    finally:
        os.close(parent)
        if child >= 0:
            os.close(child)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\r" in text and "prepare: " in text and " MB" in text
    assert "layers, " not in text  # no per-layer lines on a terminal


def test_prepare_into_another_runs_folder_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    first = subprocess.run([_script(), "prepare", "--out", str(out), "--quiet"], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    refused = subprocess.run([_script(), "prepare", "--backend", "vllm_cutlass", "--out", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert Manifest.load(out).request["backend"] == "flashinfer_cutedsl"
    replaced = subprocess.run([_script(), "prepare", "--backend", "vllm_cutlass", "--out", str(out), "--quiet",
                               "--overwrite", "--verify"], capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert Manifest.load(out).request["backend"] == "vllm_cutlass"


@pytest.mark.parametrize("backend", ["flashinfer_cutedsl", "flashinfer_trtllm"])
def test_prepare_with_the_vllm_profile_verifies_and_records_it(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "prepared"
    result = subprocess.run([_script(), "prepare", "--backend", backend, "--profile", "vllm-0.33", "--out", str(out),
                             "--quiet", "--verify"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out)
    assert manifest.layout["profile"] == "vllm-0.33" and "/vllm-0.33/" in manifest.layout["layout_id"]
    assert "verified, identical to its source" in result.stdout


def test_version_and_layer_choices_match_prepare() -> None:
    from importlib import metadata

    version = subprocess.run([_script(), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"nvfp4-prep {metadata.version('nvfp4-prep')}"
    helps = {command: subprocess.run([_script(), command, "--help"], capture_output=True, text=True,
                                     timeout=60).stdout for command in ("prepare", "layer")}
    for text in helps.values():
        flat = " ".join(text.split())
        assert "{" + ",".join(layout.BACKENDS) + "}" in flat and "(default: flashinfer_cutedsl)" in flat
        assert "{" + ",".join(layout.PROFILES) + "}" in flat
