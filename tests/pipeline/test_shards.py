"""Rank shards (SPEC section 11): the shard prepared from the whole layer equals the input shard cut by the
SPEC formulas (written here) and prepared with the layer-wide input scales; the shards of all ranks together
give back the layer; padding is zero (the reference pads with zeros)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, STACKED_NAMES, backend_activations
from nvfp4_prep.pipeline import PrepError, merge_shards, prepare, unprepare
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import GATED, as_bytes, assert_same_tensors, reference_prepare
from tests.helpers.spec_shards import local_multiple, spec_expert_ids, spec_input_shard

FLASHINFER = ("flashinfer_cutedsl", "flashinfer_cutlass", "flashinfer_trtllm")


def spec_reduced_shard(layer: dict, backend: str, activation: str, tp_rank: int, tp_size: int,
                       ids: list[int]) -> dict:
    """The input shard with the input scales each rank quantizes with: the whole layer's maximum for the
    FlashInfer backends, the rank's own for vllm_cutlass."""
    piece = spec_input_shard(layer, activation, tp_rank, tp_size, ids)
    a13, a2 = layer["w13_input_scale"], layer["w2_input_scale"]
    if backend in FLASHINFER:  # every rank quantizes with the whole layer's maximum
        piece["w13_input_scale"] = torch.full((len(ids), *a13.shape[1:]), float(a13.max()))
        piece["w2_input_scale"] = torch.full((len(ids),), float(a2.max()))
    else:
        pick = torch.tensor(ids)
        piece["w13_input_scale"], piece["w2_input_scale"] = a13[pick], a2[pick]
    return piece


@st.composite
def sharded_layers(draw):
    profile = draw(st.sampled_from(["seed", "vllm-0.33"]))
    backend = draw(st.sampled_from(BACKENDS))
    activation = draw(st.sampled_from(backend_activations(profile, backend)))
    experts = draw(st.integers(1, 8))
    ep_size = draw(st.integers(1, experts))
    tp_size = draw(st.sampled_from([1, 2, 4]))
    inter = tp_size * local_multiple(backend, activation, profile) * draw(st.integers(1, 2))
    hidden = 16 * draw(st.integers(1, 12))
    placement = draw(st.sampled_from(["linear", "round_robin"]))
    layer = random_layer(experts, hidden, inter, GATED[activation], seed=draw(st.integers(0, 2**16)),
                         shared_gate_up_scales=draw(st.booleans()))
    return profile, backend, activation, tp_size, ep_size, placement, layer


def shard_kwargs(tp_rank: int, tp_size: int, ep_rank: int, ep_size: int, placement: str) -> dict:
    return {"tp_rank": tp_rank, "tp_size": tp_size, "ep_rank": ep_rank, "ep_size": ep_size,
            "expert_placement": placement}


def check_every_rank(profile: str, backend: str, activation: str, tp_size: int, ep_size: int, placement: str,
                     layer: dict) -> None:
    experts = layer["w2_weight"].shape[0]
    parts = []
    for ep_rank in range(ep_size):
        ids = spec_expert_ids(experts, ep_rank, ep_size, placement)
        for tp_rank in range(tp_size):
            kwargs = shard_kwargs(tp_rank, tp_size, ep_rank, ep_size, placement)
            shard = prepare(layer, backend, activation, profile=profile, **kwargs)
            assert shard.layout["expert_ids"] == ids and shard.layout["global_num_experts"] == experts
            assert (shard.layout["tp_rank"], shard.layout["ep_rank"]) == (tp_rank, ep_rank)
            assert shard.layout["profile"] == profile
            assert shard.layout["num_experts"] == len(ids)
            piece = spec_reduced_shard(layer, backend, activation, tp_rank, tp_size, ids)
            direct = prepare(piece, backend, activation, profile=profile)
            if profile == "seed":
                assert_same_tensors(shard.tensors, direct.tensors)
            # The zero-filling reference: the shard's padding regions are all 0x00.
            assert_same_tensors(shard.tensors, reference_prepare(piece, backend, activation, profile))
            for key in ("hidden_dim", "intermediate_dim", "intermediate_dim_unpadded", "hidden_dim_unpadded"):
                assert shard.layout[key] == direct.layout[key], key
            back = unprepare(shard.tensors, shard.layout)
            for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
                assert torch.equal(as_bytes(back[name]), as_bytes(piece[name])), name
            parts.append((back, shard.layout))
    merged = merge_shards(parts)
    whole = prepare(layer, backend, activation, profile=profile)
    assert_same_tensors(merged, unprepare(whole.tensors, whole.layout))
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(as_bytes(merged[name]), as_bytes(layer[name])), name
    assert list(merged) == list(STACKED_NAMES)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(sharded_layers())
def test_random_shards_equal_prepared_input_shards_and_merge_back(case):
    check_every_rank(*case)


@pytest.mark.parametrize("profile, backend, activation", [
    (profile, backend, activation) for profile in ("seed", "vllm-0.33") for backend in BACKENDS
    for activation in backend_activations(profile, backend)])
def test_every_backend_and_activation_shards(profile, backend, activation):
    inter = 2 * local_multiple(backend, activation, profile)
    layer = random_layer(5, 48, inter, GATED[activation], seed=inter, shared_gate_up_scales=False)
    check_every_rank(profile, backend, activation, 2, 2, "round_robin", layer)


@pytest.mark.parametrize("experts", range(2, 9))
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_expert_placement_follows_vllm(experts, placement):
    layer = random_layer(experts, 32, 16, gated=False, seed=experts)
    for ep_size in range(2, experts + 1):
        held = []
        for ep_rank in range(ep_size):
            record = prepare(layer, "vllm_cutlass", "relu2", ep_rank=ep_rank, ep_size=ep_size,
                             expert_placement=placement).layout
            assert record["expert_ids"] == spec_expert_ids(experts, ep_rank, ep_size, placement)
            held += record["expert_ids"]
        assert sorted(held) == list(range(experts))


def test_input_scales_flashinfer_layer_wide_vllm_cutlass_own():
    layer = random_layer(6, 64, 64, seed=3, shared_gate_up_scales=False)
    a13, a2 = layer["w13_input_scale"], layer["w2_input_scale"]
    for backend in FLASHINFER:
        got = prepare(layer, backend, ep_rank=1, ep_size=3).tensors
        assert torch.equal(got["w13_input_scale"], torch.full((2,), float(a13.max()))), backend
        assert torch.equal(got["w2_input_scale"], torch.full((2,), float(a2.max()))), backend
    got = prepare(layer, "vllm_cutlass", ep_rank=1, ep_size=3, expert_placement="round_robin").tensors
    assert torch.equal(got["w13_input_scale"], torch.maximum(a13[[1, 4], 0], a13[[1, 4], 1]))
    assert torch.equal(got["w2_input_scale"], a2[[1, 4]])


def test_record_names_the_shard():
    record = prepare(random_layer(4, 64, 128), "flashinfer_trtllm", tp_rank=1, tp_size=2, ep_rank=0, ep_size=2,
                     expert_placement="round_robin").layout
    assert {k: record[k] for k in ("tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement",
                                   "global_num_experts", "expert_ids", "intermediate_dim_unpadded")} == {
        "tp_rank": 1, "tp_size": 2, "ep_rank": 0, "ep_size": 2, "expert_placement": "round_robin",
        "global_num_experts": 4, "expert_ids": [0, 2], "intermediate_dim_unpadded": 64}
    assert record["layout_id"].endswith("/tp1of2/ep0of2-round_robin")


@pytest.mark.parametrize("kwargs, inter, field", [
    ({"tp_size": 3}, 128, "tp_size"),
    ({"tp_size": 8}, 64, "tp_size"),
    ({"tp_size": 0}, 128, "tp_size"),
    ({"tp_rank": 2, "tp_size": 2}, 128, "tp_rank"),
    ({"tp_rank": -1, "tp_size": 2}, 128, "tp_rank"),
    ({"tp_rank": True, "tp_size": 2}, 128, "tp_rank"),
    ({"ep_size": 5}, 128, "ep_size"),
    ({"ep_rank": 1}, 128, "ep_rank"),
    ({"ep_size": 2, "expert_placement": "striped"}, 128, "expert_placement"),
    ({"tp_size": 4}, 128, "tp_size"),  # I / tp_size = 32 breaks the seed CuteDSL I % 64
])
def test_bad_shards_are_refused_by_name(kwargs, inter, field):
    with pytest.raises(PrepError) as caught:
        prepare(random_layer(4, 64, inter), "flashinfer_cutedsl", **kwargs)
    assert caught.value.field == field


def test_unprepare_keywords_must_agree_with_the_record():
    shard = prepare(random_layer(2, 64, 128), "vllm_cutlass", tp_rank=1, tp_size=2)
    assert torch.equal(unprepare(shard.tensors, shard.layout, tp_rank=1, tp_size=2)["w2_weight"],
                       unprepare(shard.tensors, shard.layout)["w2_weight"])
    with pytest.raises(PrepError) as caught:
        unprepare(shard.tensors, shard.layout, tp_rank=0)
    assert caught.value.field == "tp_rank"


def test_merge_refuses_incomplete_or_mixed_sets():
    layer = random_layer(4, 64, 128)
    parts = []
    for rank in range(2):
        shard = prepare(layer, "flashinfer_cutlass", ep_rank=rank, ep_size=2)
        parts.append((unprepare(shard.tensors, shard.layout), shard.layout))
    for bad, field in ((parts[:1], "shards"), ([parts[0], parts[0]], "shards"),
                       ([parts[0], (parts[1][0], {**parts[1][1], "backend": "vllm_cutlass"})], "shards.backend")):
        with pytest.raises(PrepError) as caught:
            merge_shards(bad)
        assert caught.value.field == field


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_whole_layer_keywords_change_nothing(activation):
    layer = random_layer(3, 64, 128, GATED[activation])
    for backend in BACKENDS:
        assert_same_tensors(prepare(layer, backend, activation, tp_size=1, ep_size=1).tensors,
                            prepare(layer, backend, activation).tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_shards_equal_cpu_shards(backend):
    layer = random_layer(6, 256, 256, seed=11)
    on_gpu = {name: tensor.cuda() for name, tensor in layer.items()}
    for kwargs in ({"tp_rank": 1, "tp_size": 2, "ep_rank": 1, "ep_size": 3},
                   {"tp_rank": 0, "tp_size": 4, "ep_rank": 0, "ep_size": 2, "expert_placement": "round_robin"}):
        want = prepare(layer, backend, **kwargs)
        got = prepare(on_gpu, backend, **kwargs)
        assert_same_tensors({name: tensor.cpu() for name, tensor in got.tensors.items()}, want.tensors)
        assert got.layout == want.layout
