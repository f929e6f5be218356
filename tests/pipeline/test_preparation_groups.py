"""``Preparation``: gathering a layer's weights in expert groups, as a server answering a layer that still
arrives does, writes the bytes of ``prepare`` whatever the groups, for every backend, whole layers and rank shards
alike, and of the SPEC formulas (``reference_prepare``, which shares no code with the pipeline) for whole layers;
and its checks read no tensor data."""

from __future__ import annotations

import itertools

import pytest
import torch

from nvfp4_prep.contract.layout import BACKENDS, PREPARED_NAMES
from nvfp4_prep.pipeline import PrepError, cut_shard, preparation, prepare
from nvfp4_prep.pipeline.prepare import WEIGHT_DTYPES
from nvfp4_prep.pipeline.shard import WEIGHT_NAMES
from nvfp4_prep.pipeline.validate import host_scales
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import assert_same_tensors, reference_prepare

SHARDS = [{}, {"tp_rank": 1, "tp_size": 2}, {"ep_rank": 2, "ep_size": 3, "expert_placement": "round_robin"},
          {"ep_rank": 0, "ep_size": 2, "tp_rank": 0, "tp_size": 2}]


def in_groups(tensors: dict[str, torch.Tensor], backend: str, cuts: list[int], **options) -> dict[str, torch.Tensor]:
    """Every prepared weight gathered group by group (experts between consecutive ``cuts``), in reverse group
    order so that no group leans on another's bytes, plus the scalars."""
    prep = preparation(tensors, backend, **options)
    bounds = [0, *(cut for cut in cuts if 0 < cut < prep.experts), prep.experts]
    out = {}
    for name in WEIGHT_NAMES:
        weight = torch.full(prep.weight_shape(name), 0xA5, dtype=torch.uint8)  # no byte left as it was
        for start, end in reversed(list(itertools.pairwise(bounds))):
            prep.gather(tensors, name, weight, start, end)
        out[name] = weight.view(WEIGHT_DTYPES[name])
    out.update(prep.scalars(host_scales(prep.scale_inputs(tensors))))
    return {name: out[name] for name in PREPARED_NAMES}


@pytest.mark.parametrize("shard", SHARDS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_groups_give_the_bytes_of_prepare(backend, shard):
    layer = random_layer(6, 256, 256, gated=True, seed=7)
    want = prepare(layer, backend, **shard).tensors
    for cuts in ([], [1], [1, 2, 3, 4, 5], [2, 5]):
        assert_same_tensors(in_groups(layer, backend, cuts, **shard), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_groups_give_the_bytes_of_the_spec_formulas(backend):
    layer = random_layer(6, 256, 256, gated=True, seed=11)
    assert_same_tensors(in_groups(layer, backend, [2, 3]), reference_prepare(layer, backend, "swiglu"))


def test_rank_shard_inputs_in_groups_match_the_whole_layer():
    layer = random_layer(6, 256, 256, gated=True, seed=3)
    shard = {"ep_rank": 1, "ep_size": 2, "tp_rank": 1, "tp_size": 2}
    got = in_groups(cut_shard(layer, **shard), "flashinfer_trtllm", [1, 2], inputs="shard", **shard)
    assert_same_tensors(got, in_groups(layer, "flashinfer_trtllm", [], **shard))


def test_the_checks_need_no_data():
    layer = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
             for name, t in random_layer(4, 256, 128, gated=True).items()}
    prep = preparation(layer, "flashinfer_cutlass")
    assert prep.weight_shape("w13_weight")[0] == 4
    layer["w2_weight"] = layer["w2_weight"][:, :-1]
    with pytest.raises(PrepError, match=r"^w2_weight: has shape"):
        preparation(layer, "flashinfer_cutlass")
