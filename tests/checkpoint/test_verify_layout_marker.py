"""verify checks the record loaders read first: config.json's layout marker, and no unaccounted files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvfp4_prep.contract.layout import BACKENDS
from nvfp4_prep.prepared.prepared_config import CONFIG_MARKER_KEY
from nvfp4_prep.prepared.verify import verify_prepared
from tests.helpers.checkpoint_cli import cli


@pytest.fixture
def prepared(tmp_path: Path, shared: dict[str, Path]) -> Path:
    """The sample prepared into a fresh directory that a test may tamper with."""
    out = tmp_path / "prepared"
    assert cli("prepare", shared["compressed-tensors"], "--backend", "flashinfer_cutedsl", "--out", out,
               "--quiet") == 0
    return out


def _edit_marker(out: Path, edit) -> None:
    path = out / "config.json"
    config = json.loads(path.read_text())
    edit(config[CONFIG_MARKER_KEY])
    path.write_text(json.dumps(config, indent=2) + "\n")


def _set(field: str, value: object):
    def edit(marker: dict) -> None:
        assert field in marker, field
        marker[field] = value
    return edit


def _other_backend(current: str) -> str:
    return next(backend for backend in BACKENDS if backend != current)


TAMPERED = {
    "backend": _other_backend("flashinfer_cutedsl"),
    "layout_id": "flashinfer_trtllm/fi0.7/t128/sf16/p1",
    "activation": "relu2",
    "prepared": False,
    "input_scale_policy": "strict",
    "epilogue_tile_m": 64,
    "sf_vec_size": 32,
    "pipeline_version": "999",
    "flashinfer_layout_version": "0.1",
    "manifest": "other_manifest.json",
}


def test_untouched_output_verifies(prepared: Path, capsys, shared: dict[str, Path]) -> None:
    capsys.readouterr()
    assert cli("verify", prepared, "--against", shared["compressed-tensors"]) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_each_tampered_marker_field_is_a_difference(prepared: Path, capsys, field: str,
                                                    shared: dict[str, Path]) -> None:
    _edit_marker(prepared, _set(field, TAMPERED[field]))
    capsys.readouterr()
    assert cli("verify", prepared, "--against", shared["compressed-tensors"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"DIFFERENCE config.json: {CONFIG_MARKER_KEY}.{field} "), lines
    assert [line for line in lines if line.startswith("DIFFERENCE config.json:")] == [lines[0]], lines


def test_prepared_flag_must_be_the_json_true_not_a_truthy_number(prepared: Path, shared: dict[str, Path]) -> None:
    _edit_marker(prepared, _set("prepared", 1))
    diffs = [str(d) for d in verify_prepared(prepared, shared["compressed-tensors"])]
    assert diffs and diffs[0].startswith(f"config.json: {CONFIG_MARKER_KEY}.prepared "), diffs


def test_a_removed_or_added_marker_field_is_a_difference(prepared: Path, shared: dict[str, Path]) -> None:
    def edit(marker: dict) -> None:
        del marker["backend"]
        marker["extra"] = "x"
    _edit_marker(prepared, edit)
    diffs = [str(d) for d in verify_prepared(prepared, shared["compressed-tensors"])]
    assert any(d.startswith(f"config.json: {CONFIG_MARKER_KEY}.backend ") and "missing" in d for d in diffs), diffs
    assert any(d.startswith(f"config.json: {CONFIG_MARKER_KEY}.extra ") for d in diffs), diffs


def test_a_missing_marker_is_a_difference(prepared: Path, shared: dict[str, Path]) -> None:
    path = prepared / "config.json"
    config = json.loads(path.read_text())
    del config[CONFIG_MARKER_KEY]
    path.write_text(json.dumps(config))
    diffs = [str(d) for d in verify_prepared(prepared, shared["compressed-tensors"])]
    assert diffs and diffs[0].startswith("config.json: ") and CONFIG_MARKER_KEY in diffs[0], diffs


@pytest.mark.parametrize("stray", ["notes.txt", "model-00009-of-00009.safetensors",
                                   ".model-00001-of-00003.safetensors.partial", "subdir/"])
def test_a_file_the_manifest_does_not_account_for_is_a_difference(prepared: Path, capsys, stray: str,
                                                                  shared: dict[str, Path]) -> None:
    if stray.endswith("/"):
        (prepared / stray).mkdir()
    else:
        (prepared / stray).write_bytes(b"stray")
    capsys.readouterr()
    assert cli("verify", prepared, "--against", shared["compressed-tensors"]) == 1
    out = capsys.readouterr().out
    assert f"DIFFERENCE {stray.rstrip('/')}: " in out and "not accounted for" in out, out
