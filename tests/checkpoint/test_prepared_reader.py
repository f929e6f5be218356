"""open_prepared: a folder whose layout differs from the caller's expectation is refused before any tensor
is read; layer_tensors gives the prepared bytes, each checked against the manifest's CRC32C."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nvfp4_prep.checkpoint import CheckpointInvalid, CheckpointNotFound, open_checkpoint
from nvfp4_prep.contract.layout import PREPARED_NAMES
from nvfp4_prep.pipeline import prepare
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.prepare_job import prepare_checkpoint
from nvfp4_prep.prepared.reader import PreparedLayoutMismatch, open_prepared

BACKEND = "flashinfer_cutedsl"
# A value other than the folder's for every field a caller may expect.
OTHER = {"backend": "flashinfer_trtllm", "profile": "vllm-0.33", "flashinfer_release": "0.7.4",
         "activation": "relu2", "tp_rank": 1, "tp_size": 2, "ep_rank": 1, "ep_size": 2,
         "expert_placement": "round_robin", "layout_id": "flashinfer_cutedsl/vllm-0.33/fi0.7.2.post1/swiglu/max/g64"}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    out = tmp_path_factory.mktemp("reader") / "prepared"
    with open_checkpoint(testdata / "qwen3moe_ct_nvfp4") as source:
        prepare_checkpoint(source, out, [prepare], BACKEND)
    return out


@pytest.fixture
def folder(written: Path, tmp_path: Path) -> Path:
    """A copy of the prepared folder that a test may damage."""
    return Path(shutil.copytree(written, tmp_path / "copy"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def _flip(shard: Path, tensor: str) -> None:
    length = int.from_bytes(shard.read_bytes()[:8], "little")
    begin, end = json.loads(shard.read_bytes()[8:8 + length])[tensor]["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[8 + length + (begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("field", sorted(OTHER))
def test_a_folder_made_for_other_values_is_refused_naming_the_field_before_reading(folder: Path, field: str) -> None:
    recorded = _manifest(folder)["layout"][field]
    for shard in folder.glob("*.safetensors"):  # were any tensor read, this would fail otherwise
        shard.write_bytes(b"not a safetensors file")
    with pytest.raises(PreparedLayoutMismatch) as info:
        open_prepared(folder, **{field: OTHER[field]})
    assert (info.value.field, info.value.found, info.value.expected) == (field, recorded, OTHER[field])
    assert f"layout {field} is {json.dumps(recorded)}, expected {json.dumps(OTHER[field])}" in str(info.value)
    assert isinstance(info.value, CheckpointInvalid)


def test_expectations_that_hold_open_the_folder(written: Path) -> None:
    layout = _manifest(written)["layout"]
    expected = {field: layout[field] for field in OTHER}
    with open_prepared(written, **expected) as prepared:
        assert prepared.layers() == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_a_number_is_not_a_boolean(written: Path) -> None:
    with pytest.raises(PreparedLayoutMismatch, match="tp_size"):
        open_prepared(written, tp_size=True)


def test_an_unfinished_run_is_refused(folder: Path) -> None:
    manifest = _manifest(folder)
    manifest["complete"] = False
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointInvalid, match="did not finish"):
        open_prepared(folder)


def test_a_folder_without_manifest_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match=MANIFEST_NAME):
        open_prepared(tmp_path)


def test_layer_tensors_are_the_prepared_bytes(written: Path, testdata: Path) -> None:
    with open_checkpoint(testdata / "qwen3moe_ct_nvfp4") as source, open_prepared(written) as prepared:
        assert prepared.other_tensor_names() == sorted(source.other_tensor_names())
        for prefix in source.moe_layers():
            want = prepare(source.read_layer(prefix), BACKEND)
            got = prepared.layer_tensors(prefix)
            assert list(got) == list(PREPARED_NAMES)
            for name in PREPARED_NAMES:
                assert got[name].dtype == want.tensors[name].dtype, name
                assert torch.equal(got[name].view(torch.uint8), want.tensors[name].view(torch.uint8)), name
            assert prepared.layout(prefix) == want.layout
            stored = load_file(_shard_of(written, f"{prefix}.w13_weight"))
            assert torch.equal(got["w13_weight"], stored[f"{prefix}.w13_weight"])


def test_an_unknown_layer_is_not_found(written: Path) -> None:
    known = re.escape("model.layers.0.mlp.experts")
    with open_prepared(written) as prepared, pytest.raises(CheckpointNotFound, match=known):
        prepared.layer_tensors("model.layers.7.mlp.experts")


def test_a_flipped_byte_fails_the_checksum_of_that_layer_only(folder: Path) -> None:
    name = "model.layers.1.mlp.experts.w2_weight_scale"
    _flip(_shard_of(folder, name), name)
    with open_prepared(folder) as prepared:
        with pytest.raises(CheckpointInvalid, match=r"w2_weight_scale has crc32c [0-9a-f]{8}, .* says [0-9a-f]{8}"):
            prepared.layer_tensors("model.layers.1.mlp.experts")
        unchecked = prepared.layer_tensors("model.layers.1.mlp.experts", check=False)
        assert unchecked["w2_weight_scale"].shape == (8, 512, 16)
        prepared.layer_tensors("model.layers.0.mlp.experts")  # the other layer's shard is intact


def test_a_shard_whose_layout_record_differs_from_the_manifest_is_refused(folder: Path) -> None:
    manifest = _manifest(folder)
    manifest["layout"]["layers"]["model.layers.0.mlp.experts"]["hidden_dim_unpadded"] = 500
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with open_prepared(folder) as prepared, pytest.raises(CheckpointInvalid, match="nvfp4_prep_layout"):
        prepared.layer_tensors("model.layers.0.mlp.experts")


def test_a_tensor_the_manifest_lists_otherwise_is_refused(folder: Path) -> None:
    manifest = _manifest(folder)
    shard = manifest["shards"]["model-00001-of-00003.safetensors"]
    shard["tensors"]["model.layers.0.mlp.experts.g1_alphas"]["shape"] = [4]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with open_prepared(folder) as prepared, pytest.raises(CheckpointInvalid, match=r"g1_alphas is torch.float32 \[8\]"):
        prepared.layer_tensors("model.layers.0.mlp.experts")


def test_reading_after_close_is_refused_and_returned_tensors_stay_valid(written: Path) -> None:
    prepared = open_prepared(written)
    tensors = prepared.layer_tensors("model.layers.0.mlp.experts")
    prepared.close()
    assert tensors["g1_alphas"].isfinite().all()
    with pytest.raises(ValueError, match="after close"):
        prepared.layer_tensors("model.layers.0.mlp.experts")
