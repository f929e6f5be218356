"""What the `nvfp4-prep` console script logs to stderr: warnings and the SDK's retries by default, INFO with -v
(or --log-level / NVFP4_PREP_LOG_LEVEL), and a failed call's error once, as the CLI's line, with its request id."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from nvfp4_prep.contract.layout import layout_id
from tests.helpers.fault_proxy import CuttingProxy

SCRIPT = Path(sys.executable).with_name("nvfp4-prep")
BACKEND = "flashinfer_cutlass"
REQUEST_ID = r"[0-9a-f]{32}"

pytestmark = pytest.mark.skipif(not SCRIPT.exists() and shutil.which("nvfp4-prep") is None,
                                reason="the nvfp4-prep console script is not installed in this environment")


def _run(*argv: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = str(SCRIPT) if SCRIPT.exists() else str(shutil.which("nvfp4-prep"))
    environ = {name: value for name, value in os.environ.items() if not name.startswith("NVFP4_PREP_")}
    return subprocess.run([script, *map(str, argv)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**environ, **(env or {})})


@pytest.fixture
def layer_file(make_layer, tmp_path: Path) -> Path:
    path = tmp_path / "in.safetensors"
    save_file(make_layer(experts=8, hidden=1024, inter=512), str(path))  # a ~6 MB answer
    return path


def test_a_retry_shows_by_default(prep_address, layer_file: Path, tmp_path: Path) -> None:
    proxy = CuttingProxy(int(prep_address.rsplit(":", 1)[1]), cut_after=256 << 10)
    try:
        result = _run("layer", layer_file, tmp_path / "out.safetensors", "--server", proxy.address,
                      "--backend", BACKEND, "--quiet")
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1
    retries = [line for line in result.stderr.splitlines() if "nvfp4_prep.client.retry" in line]
    assert retries and re.search(rf"request {REQUEST_ID}: attempt 1 failed \(UNAVAILABLE", retries[0])
    assert "retrying in" in retries[0]
    assert " INFO nvfp4_prep.client.sdk" not in result.stderr  # the SDK's other INFO lines need -v


@pytest.mark.parametrize("flags", [(), ("-v",)], ids=["default", "verbose"])
def test_a_failed_call_is_reported_once_with_its_request_id(prep_address, make_layer, tmp_path: Path,
                                                            flags: tuple[str, ...]) -> None:
    layer = make_layer()
    layer["w2_input_scale"] = -layer["w2_input_scale"]
    source = tmp_path / "bad.safetensors"
    save_file(layer, str(source))
    result = _run("layer", source, tmp_path / "out.safetensors", "--server", prep_address, "--backend", BACKEND,
                  "--quiet", *flags)
    assert result.returncode == 1
    mentions = [line for line in result.stderr.splitlines() if "w2_input_scale" in line]
    assert len(mentions) == 1, result.stderr
    assert re.fullmatch(rf"nvfp4-prep layer: INVALID_ARGUMENT: w2_input_scale.* \(request {REQUEST_ID}\)",
                        mentions[0]), mentions[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flags", "env"), [
    (("-v",), {}),
    (("--log-level", "info"), {}),
    ((), {"NVFP4_PREP_LOG_LEVEL": "INFO"}),
], ids=["-v", "--log-level", "environment"])
def test_info_lines_show_when_asked_for(prep_address, layer_file: Path, tmp_path: Path, flags, env) -> None:
    result = _run("layer", layer_file, tmp_path / "out.safetensors", "--server", prep_address, "--backend",
                  BACKEND, "--quiet", *flags, env=env)
    assert result.returncode == 0, result.stderr
    done = re.search(rf" INFO nvfp4_prep.client.sdk: request {REQUEST_ID}: prepared for (\S+)$", result.stderr,
                     re.MULTILINE)
    assert done is not None, result.stderr
    assert done[1] == layout_id(BACKEND)


def test_by_default_a_successful_call_logs_nothing(prep_address, layer_file: Path, tmp_path: Path) -> None:
    quiet = _run("layer", layer_file, tmp_path / "out.safetensors", "--server", prep_address, "--backend", BACKEND,
                 "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    # -v before the command counts too, and the more talkative of -v and --log-level wins
    result = _run("-v", "--log-level", "ERROR", "layer", layer_file, tmp_path / "out2.safetensors",
                  "--server", prep_address, "--backend", BACKEND, "--quiet")
    assert result.returncode == 0, result.stderr
    assert " INFO nvfp4_prep.client.sdk: request " in result.stderr
