"""verify_integrity: a prepared folder checked against its own manifest, no source needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import crc32c
import pytest

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.prepared.integrity import verify_integrity
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from tests.helpers.checkpoint_factory import moe_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "prepared"
    with open_checkpoint(testdata / "qwen3moe_modelopt_nvfp4") as source:
        prepare_checkpoint(source, out, [prepare], "flashinfer_trtllm")
    return out


@pytest.fixture
def folder(written: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "copy"))


def _shards(folder: Path) -> list[str]:
    return sorted(json.loads((folder / MANIFEST_NAME).read_text())["shards"])


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def _flip_at(path: Path, at: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def _positions(shard: Path) -> dict[str, int]:
    """Byte offsets to damage: the header length, inside the header, its padding, each tensor's data."""
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    spots = {"length": 0, "metadata": 8 + data.index(b"nvfp4_prep_layout") + 3, "header end": 8 + length - 1}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            spots[name] = 8 + length + (begin + end) // 2
    spots["last byte"] = len(data) - 1
    return spots


def test_an_untouched_folder_passes(written: Path) -> None:
    assert verify_integrity(written) == []


def test_one_flipped_byte_anywhere_in_any_shard_is_caught(folder: Path) -> None:
    for filename in _shards(folder):
        shard = folder / filename
        original = shard.read_bytes()
        for where, at in _positions(shard).items():
            _flip_at(shard, at)
            diffs = verify_integrity(folder)
            assert diffs, (filename, where)
            assert {d.tensor for d in diffs} <= {filename, *json.loads((folder / MANIFEST_NAME).read_text())
                                                 ["shards"][filename]["tensors"]}, (filename, where, diffs)
            shard.write_bytes(original)
    assert verify_integrity(folder) == []


def test_single_byte_changes_throughout_the_headers_are_caught(tmp_path: Path) -> None:
    """Header bytes in turn, on a small synthetic checkpoint: every byte of the carried tensors' shard and
    every 5th of the layer's (to bound the time on a loaded machine). A padding space becomes a newline
    (still valid JSON, same content); every other byte flips its lowest bit."""
    source = moe_checkpoint(tmp_path / "source", layers=1, experts=2, hidden=64, inter=64, dense=True)
    out = tmp_path / "prepared"
    with open_checkpoint(source) as opened:
        prepare_checkpoint(opened, out, [prepare], "flashinfer_cutedsl")
    assert verify_integrity(out) == []
    for filename in _shards(out):
        shard = out / filename
        original = shard.read_bytes()
        step = 1 if json.loads((out / MANIFEST_NAME).read_text())["shards"][filename]["layer"] is None else 5
        for at in range(0, 8 + int.from_bytes(original[:8], "little"), step):
            _flip_at(shard, at, 0x2A if original[at] == 0x20 else 0x01)
            assert verify_integrity(out), (filename, at)
            shard.write_bytes(original)


def _stored_crc(shard: Path, name: str) -> str:
    """CRC32C of a tensor's bytes, read from the file by its header offsets (independent of our reader)."""
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + length])[name]["data_offsets"]
    return f"{crc32c.crc32c(data[8 + length + begin:8 + length + end]):08x}"


def test_a_manifest_with_a_wrong_checksum_is_caught(folder: Path) -> None:
    filename, name = _shards(folder)[0], "model.layers.0.mlp.experts.w13_weight"
    _edit_manifest(folder, lambda m: m["shards"][filename]["tensors"][name].update(crc32c="00000000"))
    assert [str(d) for d in verify_integrity(folder)] == [
        f"{name}: crc32c {_stored_crc(folder / filename, name)}, {MANIFEST_NAME} says 00000000"]


def test_a_manifest_with_a_wrong_size_is_caught(folder: Path) -> None:
    filename = _shards(folder)[1]
    size = (folder / filename).stat().st_size
    _edit_manifest(folder, lambda m: m["shards"][filename].update(size=size + 8))
    assert [str(d) for d in verify_integrity(folder)] == [f"{filename}: {size} bytes, {MANIFEST_NAME} says {size + 8}"]


def test_a_manifest_missing_a_tensor_is_caught(folder: Path) -> None:
    filename, name = _shards(folder)[0], "model.layers.0.mlp.experts.g2_alphas"
    _edit_manifest(folder, lambda m: m["shards"][filename]["tensors"].pop(name))
    diffs = [str(d) for d in verify_integrity(folder)]
    assert f"{name}: in {filename} but not listed there by {MANIFEST_NAME}" in diffs, diffs


def test_a_manifest_listing_a_tensor_the_shard_lacks_is_caught(folder: Path) -> None:
    filename, name = _shards(folder)[0], "model.layers.0.mlp.experts.extra"
    _edit_manifest(folder, lambda m: m["shards"][filename]["tensors"].update(
        {name: {"dtype": "F32", "shape": [8], "crc32c": "00000000"}}))
    diffs = [str(d) for d in verify_integrity(folder)]
    assert f"{name}: listed in {MANIFEST_NAME} under {filename} but not in its header" in diffs, diffs


@pytest.mark.parametrize("edit", ["shared field", "layer sizes"])
def test_a_manifest_whose_layout_was_edited_is_caught(folder: Path, edit: str) -> None:
    def change(manifest: dict) -> None:
        if edit == "shared field":
            manifest["layout"]["epilogue_tile_m"] = 64
        else:
            manifest["layout"]["layers"]["model.layers.1.mlp.experts"]["intermediate_dim"] = 128
    _edit_manifest(folder, change)
    diffs = [str(d) for d in verify_integrity(folder)]
    shards = _shards(folder)
    edited = shards if edit == "shared field" else [shards[1]]  # every shard's record carries the shared fields
    for filename in edited:
        assert any(d.startswith(f"{filename}: metadata nvfp4_prep_layout ") for d in diffs), (filename, diffs)
    assert any(d.startswith("config.json: nvfp4_prep.epilogue_tile_m ") for d in diffs) == (edit == "shared field")


def test_a_listed_shard_that_is_gone_is_caught(folder: Path) -> None:
    filename = _shards(folder)[2]
    (folder / filename).unlink()
    diffs = [str(d) for d in verify_integrity(folder)]
    assert f"{filename}: listed in {MANIFEST_NAME} but missing from {folder}" in diffs, diffs


@pytest.mark.parametrize("stray", ["model-00004-of-00004.safetensors", "pytorch_model.bin", "hf_quant_config.json"])
def test_a_file_a_loader_would_read_is_caught(folder: Path, stray: str) -> None:
    (folder / stray).write_bytes(b"{}")
    assert [d.tensor for d in verify_integrity(folder)] == [stray]


def test_an_index_that_disagrees_with_the_manifest_is_caught(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    name = "model.layers.0.mlp.experts.w2_weight"
    index["weight_map"][name] = _shards(folder)[2]
    (folder / INDEX).write_text(json.dumps(index))
    assert [d.tensor for d in verify_integrity(folder)] == [name]


def test_a_config_marker_that_disagrees_is_caught(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = config["quantization_config"]["original_quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    diffs = [str(d) for d in verify_integrity(folder)]
    assert len(diffs) == 1 and diffs[0].startswith("config.json: quantization_config is "), diffs


def test_an_unfinished_run_is_reported(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(complete=False))
    diffs = [str(d) for d in verify_integrity(folder)]
    assert diffs == [f"{MANIFEST_NAME}: the prepare run that wrote it did not finish"]


def test_each_folder_of_a_rank_set_is_checked(tmp_path: Path, testdata: Path) -> None:
    out = tmp_path / "ranks"
    with open_checkpoint(testdata / "qwen3moe_ct_nvfp4") as source:
        prepare_checkpoint(source, out, [prepare], "flashinfer_cutlass", ep_size=2)
    assert verify_integrity(out) == []
    rank = sorted(path for path in out.iterdir() if path.is_dir())[1]
    name = "model.layers.1.mlp.experts.w13_weight"
    shard = rank / json.loads((rank / INDEX).read_text())["weight_map"][name]
    _flip_at(shard, shard.stat().st_size - 1)
    diffs = verify_integrity(out)
    assert diffs and all(d.tensor.startswith(f"{rank.name}/") for d in diffs), diffs
