"""`--layout-version ID` pins the layout every prepared layer must carry, for `layer` and for `prepare` (on a
server and in this process): the right id passes, another fails with one line naming both ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import save_file

from nvfp4_prep.cli.main import main
from nvfp4_prep.contract.layout import layout_id
from nvfp4_prep.prepared.manifest import Manifest
from tests.helpers.checkpoint_factory import moe_checkpoint

BACKEND = "flashinfer_cutlass"
WRONG = "flashinfer_cutlass/some-other-release"
REQUEST = re.compile(r"\(request [0-9a-f]{32}\)$")


def _one_line(err: str) -> str:
    """The one line of ``err`` that names the pinned id (warnings about the layer itself may come before it)."""
    lines = [line for line in err.splitlines() if WRONG in line]
    assert len(lines) == 1, err
    return lines[0]


def test_layer_with_the_right_layout_version_writes_it(prep_address, make_layer, tmp_path: Path, capsys) -> None:
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(make_layer(), str(source))
    capsys.readouterr()
    assert main(["layer", str(source), str(target), "--server", prep_address, "--backend", BACKEND,
                 "--layout-version", layout_id(BACKEND)]) == 0
    assert target.is_file()
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar: the result line, naming the call
    assert last.startswith(f"wrote {target}: ") and f"layout {layout_id(BACKEND)} " in last and REQUEST.search(last)


def test_layer_with_another_layout_version_names_both(prep_address, make_layer, tmp_path: Path, capsys) -> None:
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(make_layer(), str(source))
    capsys.readouterr()
    assert main(["layer", str(source), str(target), "--server", prep_address, "--backend", BACKEND, "--quiet",
                 "--layout-version", WRONG]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("nvfp4-prep layer: FAILED_PRECONDITION: ")
    assert layout_id(BACKEND) in line and WRONG in line and REQUEST.search(line)
    assert not target.exists()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return moe_checkpoint(tmp_path / "ckpt", layers=2, experts=2, hidden=256, inter=128)


@pytest.mark.parametrize("on_server", [False, True], ids=["in-process", "server"])
def test_prepare_with_the_right_layout_version(checkpoint: Path, tmp_path: Path, start_server, on_server) -> None:
    servers = ["--server", start_server().address] if on_server else []
    out = tmp_path / "prepared"
    assert main(["prepare", str(checkpoint), "--out", str(out), "--backend", BACKEND, "--quiet",
                 "--layout-version", layout_id(BACKEND), *servers]) == 0
    assert Manifest.load(out).layout["layout_id"] == layout_id(BACKEND)


@pytest.mark.parametrize("on_server", [False, True], ids=["in-process", "server"])
def test_prepare_with_another_layout_version_names_both(checkpoint: Path, tmp_path: Path, start_server, capsys,
                                                        on_server) -> None:
    servers = ["--server", start_server().address] if on_server else []
    out = tmp_path / "prepared"
    capsys.readouterr()
    assert main(["prepare", str(checkpoint), "--out", str(out), "--backend", BACKEND, "--quiet",
                 "--layout-version", WRONG, *servers]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("nvfp4-prep prepare: ") and layout_id(BACKEND) in line and WRONG in line
    assert not out.exists()  # refused before anything was opened or created, with or without a server


def test_the_layout_version_comes_from_the_environment(checkpoint: Path, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    monkeypatch.setenv("NVFP4_PREP_LAYOUT_VERSION", WRONG)
    assert main(["prepare", str(checkpoint), "--out", str(tmp_path / "prepared"), "--backend", BACKEND,
                 "--quiet"]) == 2
    assert WRONG in capsys.readouterr().err
