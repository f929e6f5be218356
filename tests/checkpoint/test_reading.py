"""Reading NVFP4 checkpoints: format detection, MoE discovery, naming schemes, shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import CheckpointNotFound, open_checkpoint
from nvfp4_prep.pipeline import assemble_layer
from tests.helpers.checkpoint_factory import (
    FORMATS,
    dense_tensors,
    load_all,
    moe_layer_tensors,
    nvfp4_projection,
    sharded_copy,
    write_checkpoint,
)

PREFIXES = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_checkpoints_are_detected_with_two_layers_of_eight_experts(fmt: str, shared: dict[str, Path]) -> None:
    checkpoint = open_checkpoint(shared[fmt])
    assert checkpoint.format == fmt
    assert checkpoint.moe_layers() == PREFIXES
    for prefix in PREFIXES:
        layer = checkpoint.layer(prefix)
        assert layer.num_experts == 8
        assert layer.projections == ("gate_proj", "up_proj", "down_proj")
        assert len(layer.tensor_names) == 8 * 3 * 4
    others = checkpoint.other_tensor_names()
    assert "model.layers.0.mlp.gate.weight" in others and "model.layers.1.self_attn.q_proj.weight_scale" in others
    assert not any(".mlp.experts." in name for name in others)
    assert len(others) + 2 * 96 == len(load_all(shared[fmt] / "model.safetensors"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_layer_equals_the_safetensors_library_reading(fmt: str, shared: dict[str, Path]) -> None:
    """Our reader gives the same tensors as safetensors' own loader."""
    reference = load_all(shared[fmt] / "model.safetensors")
    checkpoint = open_checkpoint(shared[fmt])
    prefix = PREFIXES[1]
    expected = assemble_layer({name[len(prefix) + 1:]: tensor for name, tensor in reference.items()
                               if name.startswith(prefix + ".")})
    stacked = checkpoint.read_layer(prefix)
    assert stacked.keys() == expected.keys()
    for name, tensor in expected.items():
        assert stacked[name].dtype == tensor.dtype and torch.equal(as_bytes(stacked[name]), as_bytes(tensor)), name
    for name in checkpoint.other_tensor_names():
        assert torch.equal(as_bytes(checkpoint.read_tensor(name)), as_bytes(reference[name])), name


def test_file_uri_file_path_and_index_path_open_the_same_checkpoint(tmp_path: Path, ct_checkpoint: Path) -> None:
    sharded = sharded_copy(ct_checkpoint, tmp_path / "sharded", 3)
    for location in (ct_checkpoint.as_uri(), str(ct_checkpoint / "model.safetensors"),
                     sharded / "model.safetensors.index.json", f"file://localhost{sharded}"):
        checkpoint = open_checkpoint(location)
        assert checkpoint.format == "compressed-tensors" and checkpoint.moe_layers() == PREFIXES


@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_copy_gives_identical_stacked_tensors(tmp_path: Path, fmt: str, shared: dict[str, Path]) -> None:
    single = open_checkpoint(shared[fmt])
    sharded = open_checkpoint(sharded_copy(shared[fmt], tmp_path / "sharded", 4))
    assert len(sharded.shard_files()) == 4
    assert sharded.moe_layers() == single.moe_layers()
    assert sorted(sharded.other_tensor_names()) == sorted(single.other_tensor_names())
    for prefix in PREFIXES:
        assert len(sharded.shard_files(prefix)) == 4  # round-robin spreads every layer over all shards
        a, b = single.read_layer(prefix), sharded.read_layer(prefix)
        for name in a:
            assert torch.equal(as_bytes(a[name]), as_bytes(b[name])), name


def test_mixtral_naming_is_discovered_and_stacked_gate_then_up(tmp_path: Path) -> None:
    tensors = dense_tensors(hidden=128)
    for layer in range(3):
        tensors.update(moe_layer_tensors(layer, experts=4, hidden=128, inter=64, fmt="compressed-tensors",
                                         naming="mixtral", seed=layer))
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "mixtral", tensors, fmt="compressed-tensors"))
    assert checkpoint.format == "compressed-tensors"
    assert checkpoint.moe_layers() == [f"model.layers.{i}.block_sparse_moe.experts" for i in range(3)]
    prefix = "model.layers.2.block_sparse_moe.experts"
    assert checkpoint.layer(prefix).projections == ("w1", "w3", "w2")
    stacked = checkpoint.read_layer(prefix)
    for e in range(4):
        w1 = tensors[f"{prefix}.{e}.w1.weight_packed"]
        w3 = tensors[f"{prefix}.{e}.w3.weight_packed"]
        assert torch.equal(stacked["w13_weight"][e], torch.cat([w1, w3]))
        assert torch.equal(stacked["w2_weight"][e], tensors[f"{prefix}.{e}.w2.weight_packed"])
        # compressed-tensors stores the inverse global scale (SPEC section 1)
        expected = torch.reciprocal(tensors[f"{prefix}.{e}.w2.weight_global_scale"].reshape(()))
        assert torch.equal(stacked["w2_weight_scale_2"][e], expected)
    assert "model.layers.2.block_sparse_moe.gate.weight" in checkpoint.other_tensor_names()


def test_dense_shared_excluded_and_unquantized_layers_are_left_alone(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden, inter = 128, 64
    tensors = dense_tensors(hidden)
    for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        for suffix, tensor in nvfp4_projection(*shape, "modelopt", gen).items():
            tensors[f"model.layers.0.mlp.{proj}.{suffix}"] = tensor          # dense MLP
            tensors[f"model.layers.1.mlp.shared_experts.{proj}.{suffix}"] = tensor.clone()  # DeepSeek shared expert
    tensors.update(moe_layer_tensors(1, 4, hidden, inter))                        # the one MoE layer to prepare
    tensors.update(moe_layer_tensors(2, 4, hidden, inter))                        # excluded by the config
    for e in range(4):                                                            # bf16 experts, not quantized
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"model.layers.3.mlp.experts.{e}.{proj}.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "mixed", tensors, ignore=["model.layers.2.mlp.experts*"]))
    assert checkpoint.moe_layers() == ["model.layers.1.mlp.experts"]
    others = set(checkpoint.other_tensor_names())
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in others
    assert "model.layers.2.mlp.experts.3.down_proj.weight_scale" in others
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in others
    assert len(others) + 4 * 3 * 4 == len(tensors)


def test_compressed_tensors_regex_ignore_excludes_a_layer(tmp_path: Path) -> None:
    tensors = {**moe_layer_tensors(0, 2, 64, 64, fmt="compressed-tensors"),
               **moe_layer_tensors(1, 2, 64, 64, fmt="compressed-tensors")}
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ct", tensors, fmt="compressed-tensors",
                                                  ignore=["re:.*layers\\.0\\.mlp\\.experts.*"]))
    assert checkpoint.moe_layers() == ["model.layers.1.mlp.experts"]


def test_layers_sort_by_layer_number_not_text(tmp_path: Path) -> None:
    tensors = {}
    for layer in (10, 2, 1):
        tensors.update(moe_layer_tensors(layer, 2, 64, 64))
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "order", tensors))
    assert checkpoint.moe_layers() == [f"model.layers.{i}.mlp.experts" for i in (1, 2, 10)]


def test_unquantized_checkpoint_opens_as_bf16_with_its_moe_layers(testdata: Path) -> None:
    """Without a quantization config the checkpoint is a BF16 source (for --quantize), not an NVFP4 one."""
    with open_checkpoint(testdata / "qwen3moe_bf16") as checkpoint:
        assert checkpoint.format == "bf16"
        assert checkpoint.moe_layers() == list(PREFIXES)


def test_unknown_layer_prefix_is_not_found(ct_checkpoint: Path) -> None:
    checkpoint = open_checkpoint(ct_checkpoint)
    with pytest.raises(CheckpointNotFound, match=r"model\.layers\.7\.mlp\.experts"):
        checkpoint.read_layer("model.layers.7.mlp.experts")


def test_source_identity_follows_the_layer_shards(tmp_path: Path, ct_checkpoint: Path) -> None:
    sharded = sharded_copy(ct_checkpoint, tmp_path / "sharded", 2)
    before = open_checkpoint(sharded).source_identity(PREFIXES[0])
    assert before.count("model-0000") == 2
    shard = sharded / "model-00001-of-00002.safetensors"
    os.utime(shard, ns=(1, 1))
    assert open_checkpoint(sharded).source_identity(PREFIXES[0]) != before


def test_several_tensors_read_together_equal_the_library_reading(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from nvfp4_prep.checkpoint.safetensors_file import SafetensorsFile

    gen = torch.Generator().manual_seed(5)
    tensors = {"a.scale": torch.rand((), generator=gen), "b.scale": torch.rand(3, generator=gen).to(torch.bfloat16),
               "c.empty": torch.empty(0, 4), "d.codes": torch.randint(0, 256, (4, 8), dtype=torch.uint8,
                                                                        generator=gen),
               "e.scale": torch.rand(2, 2, generator=gen, dtype=torch.float64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    file = SafetensorsFile(path)
    try:
        got = file.tensors(["e.scale", "a.scale", "c.empty", "b.scale", "d.codes"])
    finally:
        file.close()
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(want)), name
