"""Reading a rank's input shard from a checkpoint (SPEC section 11): only the rank's bytes are read, and what is read
equals the input shard cut from the whole layer's read.

The byte count is checked against the formula: the rank's experts' weight and block-scale slices (gate and up
rows, down columns), their global weight scales, and every expert's input scales, 4 bytes each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nvfp4_prep.checkpoint import CheckpointInvalid, open_checkpoint
from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.pipeline import cut_shard
from nvfp4_prep.pipeline.shard import Shard
from tests.helpers.checkpoint_factory import FORMATS, moe_layer_tensors, write_checkpoint
from tests.helpers.pipeline_reference import GATED, as_bytes

EXPERTS, HIDDEN, INTER = 6, 256, 128
SHARDS = [
    {"tp_rank": 1, "tp_size": 2},
    {"tp_rank": 3, "tp_size": 4, "ep_rank": 0, "ep_size": 4},
    {"tp_rank": 0, "tp_size": 2, "ep_rank": 1, "ep_size": 4, "expert_placement": "round_robin"},
    {"ep_rank": 2, "ep_size": 3},
    {"ep_rank": 1, "ep_size": 6, "expert_placement": "round_robin"},
]
SCALAR_BYTES = 4


def shard_id(shard: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shard.items())


def rank_bytes(shard: dict, experts: int, hidden: int, inter: int, projections: int = 3) -> int:
    """The bytes a rank must read, by the formula of the module docstring."""
    held = len(Shard(**shard).expert_ids(experts))
    local = inter // shard.get("tp_size", 1)
    gate_up = (projections - 1) * (local * hidden // 2 + local * hidden // 16)
    down = hidden * local // 2 + hidden * local // 16
    global_scales = projections * SCALAR_BYTES
    return held * (gate_up + down + global_scales) + experts * projections * SCALAR_BYTES


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name


@pytest.fixture(params=[(fmt, naming, files) for fmt in FORMATS for naming, files in (("qwen", 1), ("mixtral", 3))],
                ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}files")
def checkpoint_dir(request, tmp_path: Path) -> tuple[Path, str]:
    fmt, naming, files = request.param
    tensors = moe_layer_tensors(0, EXPERTS, HIDDEN, INTER, fmt=fmt, naming=naming, seed=7)
    block = "mlp" if naming == "qwen" else "block_sparse_moe"
    return write_checkpoint(tmp_path / "ckpt", tensors, fmt=fmt, shards=files), f"model.layers.0.{block}.experts"


@pytest.mark.parametrize("shard", SHARDS, ids=shard_id)
@pytest.mark.parametrize("activation", ["swiglu", "swigluoai", "relu2"])
def test_a_rank_reads_only_its_bytes_and_gets_the_cut_of_the_whole_layer(checkpoint_dir, shard, activation):
    directory, prefix = checkpoint_dir
    with open_checkpoint(directory) as checkpoint:
        whole = checkpoint.read_layer(prefix, activation)
        whole_bytes = checkpoint.bytes_read
        got = checkpoint.read_layer(prefix, activation, shard=Shard(**shard))
        read = checkpoint.bytes_read - whole_bytes
    assert_same(got, cut_shard(whole, activation, **shard))
    assert read == rank_bytes(shard, EXPERTS, HIDDEN, INTER)
    # The layer, every tensor of it once: 3 projections of weight, block scale and two scalars per expert.
    assert whole_bytes == EXPERTS * (3 * (INTER * HIDDEN // 2 + INTER * HIDDEN // 16) + 3 * 2 * SCALAR_BYTES)
    # So the rank's weight bytes are its share of the layer's: n of E experts, 1 / tp_size of each.
    held = len(Shard(**shard).expert_ids(EXPERTS))
    scalars = (held + EXPERTS) * 3 * SCALAR_BYTES
    layer_scalars = EXPERTS * 3 * 2 * SCALAR_BYTES
    assert (read - scalars) * EXPERTS * shard.get("tp_size", 1) == (whole_bytes - layer_scalars) * held


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_of_the_real_checkpoints(shared, fmt):
    prefix = "model.layers.1.mlp.experts"
    with open_checkpoint(shared[fmt]) as checkpoint:
        whole = checkpoint.read_layer(prefix)
        experts = whole["w2_input_scale"].shape[0]
        hidden, inter = whole["w2_weight"].shape[1], 2 * whole["w2_weight"].shape[2]
        for shard in ({"tp_rank": 1, "tp_size": 2, "ep_rank": 2, "ep_size": 3}, {"tp_rank": 3, "tp_size": 4}):
            before = checkpoint.bytes_read
            got = checkpoint.read_layer(prefix, shard=Shard(**shard))
            assert checkpoint.bytes_read - before == rank_bytes(shard, experts, hidden, inter)
            assert_same(got, cut_shard(whole, **shard))


def test_the_plan_names_what_is_read_before_reading(checkpoint_dir):
    directory, prefix = checkpoint_dir
    shard = {"tp_rank": 1, "tp_size": 2, "ep_rank": 0, "ep_size": 2, "expert_placement": "round_robin"}
    with open_checkpoint(directory) as checkpoint:
        reads = checkpoint.rank_reads(prefix, Shard(**shard))
        assert checkpoint.bytes_read == 0
        assert reads.expert_ids == (0, 2, 4)
        assert sum(read.nbytes for read in reads.all()) == rank_bytes(shard, EXPERTS, HIDDEN, INTER)
        checkpoint.read_layer(prefix, shard=Shard(**shard))
        assert checkpoint.bytes_read == rank_bytes(shard, EXPERTS, HIDDEN, INTER)


@pytest.mark.parametrize("shard, field", [({"tp_size": 3}, "tp_size"), ({"tp_size": 16}, "tp_size"),
                                          ({"ep_size": EXPERTS + 1}, "ep_size"), ({"ep_rank": 1}, "ep_rank")])
def test_a_shard_the_layer_cannot_be_cut_into_is_refused_by_name(checkpoint_dir, shard, field):
    directory, prefix = checkpoint_dir
    with open_checkpoint(directory) as checkpoint, pytest.raises(PrepError) as caught:
        checkpoint.read_layer(prefix, shard=Shard(**shard))
    assert caught.value.field == field
    assert checkpoint.bytes_read == 0


def test_a_down_projection_of_another_intermediate_size_is_refused(tmp_path: Path):
    tensors = moe_layer_tensors(0, 2, 64, 64)
    prefix = "model.layers.0.mlp.experts"
    tensors[f"{prefix}.1.down_proj.weight"] = torch.zeros(64, 16, dtype=torch.uint8)  # I = 32, not 64
    with open_checkpoint(write_checkpoint(tmp_path / "ckpt", tensors)) as checkpoint:
        with pytest.raises(CheckpointInvalid, match=r"1\.down_proj\.weight.*expected \[H, 32\]"):
            checkpoint.read_layer(prefix, shard=Shard(tp_size=2))


def test_a_shard_truncated_during_a_column_read_is_invalid_naming_it(tmp_path: Path):
    """Column blocks are read row by row from the descriptor (no mmap): a file cut under the read is a clean
    CheckpointInvalid, as for whole tensors."""
    directory = write_checkpoint(tmp_path / "ckpt", moe_layer_tensors(0, 2, 64, 64))
    file = directory / "model.safetensors"
    calls = []

    def interrupt() -> None:  # asked before each tensor: the 7th is expert 0's down weight, a column block
        calls.append(1)
        if len(calls) == 7:
            os.truncate(file, 64)

    with open_checkpoint(directory) as checkpoint, pytest.raises(CheckpointInvalid) as caught:
        checkpoint.read_layer("model.layers.0.mlp.experts", shard=Shard(tp_rank=1, tp_size=2), interrupt=interrupt)
    assert len(calls) == 7
    assert str(file) in str(caught.value) and "changed while being read" in str(caught.value)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_gated_flags_follow_the_activation(checkpoint_dir, activation):
    """A non-gated read stacks one input scale per expert, a gated one gate and up."""
    directory, prefix = checkpoint_dir
    with open_checkpoint(directory) as checkpoint:
        got = checkpoint.read_layer(prefix, activation, shard=Shard(ep_rank=0, ep_size=2))
    assert got["w13_input_scale"].shape == ((EXPERTS, 2) if GATED[activation] else (EXPERTS,))
