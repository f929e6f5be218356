"""Preparing from a rank's input shard (SPEC section 11): ``prepare(shard_inputs, ..., inputs="shard")`` gives the
same bytes as ``prepare(whole_layer, ...)`` with the same shard keywords, for random shapes, shard counts,
placements, backends and profiles; the input shard is cut here by the SPEC's words, independently of the
pipeline, and ``cut_shard`` must cut the same bytes. Input shards of the wrong shape are refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_prep.contract.layout import BACKENDS, STACKED_NAMES, backend_activations
from nvfp4_prep.pipeline import PrepError, cut_shard, prepare
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import GATED, as_bytes, assert_same_tensors
from tests.helpers.spec_shards import local_multiple, spec_expert_ids, spec_input_shard


@st.composite
def cases(draw):
    profile = draw(st.sampled_from(["seed", "vllm-0.33"]))
    backend = draw(st.sampled_from(BACKENDS))
    activation = draw(st.sampled_from(backend_activations(profile, backend)))
    group = draw(st.sampled_from([64, 16])) if backend == "flashinfer_cutedsl" and profile == "seed" else 64
    experts = draw(st.integers(1, 9))
    ep_size = draw(st.integers(1, experts))
    tp_size = draw(st.sampled_from([1, 2, 3, 4]))
    inter = tp_size * local_multiple(backend, activation, profile) * draw(st.integers(1, 3))
    hidden = 16 * draw(st.integers(1, 20))
    placement = draw(st.sampled_from(["linear", "round_robin"]))
    policy = draw(st.sampled_from(["max", "strict"]))
    layer = random_layer(experts, hidden, inter, GATED[activation], seed=draw(st.integers(0, 2**16)),
                         shared_gate_up_scales=draw(st.booleans()))
    if policy == "strict":  # one input scale shared by every expert, gate and up alike
        layer["w13_input_scale"].fill_(0.75)
        layer["w2_input_scale"].fill_(1.25)
    ranks = (draw(st.integers(0, tp_size - 1)), draw(st.integers(0, ep_size - 1)))
    return profile, backend, activation, policy, group, tp_size, ep_size, placement, ranks, layer


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_prepare_from_the_input_shard_equals_prepare_of_the_whole_layer(case):
    profile, backend, activation, policy, group, tp_size, ep_size, placement, (tp_rank, ep_rank), layer = case
    shard = {"tp_rank": tp_rank, "tp_size": tp_size, "ep_rank": ep_rank, "ep_size": ep_size,
             "expert_placement": placement}
    options = {"profile": profile, "gated_group_size": group, **shard}
    ids = spec_expert_ids(len(layer["w2_input_scale"]), ep_rank, ep_size, placement)
    piece = spec_input_shard(layer, activation, tp_rank, tp_size, ids)
    want = prepare(layer, backend, activation, policy, **options)
    got = prepare(piece, backend, activation, policy, inputs="shard", **options)
    assert_same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout

    cut = cut_shard(layer, activation, **shard)
    assert list(cut) == list(STACKED_NAMES)
    for name, tensor in piece.items():
        assert cut[name].dtype == tensor.dtype and cut[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(cut[name]), as_bytes(tensor)), name


def test_flashinfer_ranks_reduce_over_every_expert_vllm_cutlass_keeps_its_own():
    layer = random_layer(6, 64, 128, seed=5, shared_gate_up_scales=False)
    ids = spec_expert_ids(6, 1, 3, "round_robin")
    piece = spec_input_shard(layer, "swiglu", 0, 1, ids)
    a13, a2 = layer["w13_input_scale"], layer["w2_input_scale"]
    shard = {"ep_rank": 1, "ep_size": 3, "expert_placement": "round_robin"}
    got = prepare(piece, "flashinfer_trtllm", inputs="shard", **shard).tensors
    assert torch.equal(got["w13_input_scale"], torch.full((len(ids),), float(a13.max())))
    assert torch.equal(got["w2_input_scale"], torch.full((len(ids),), float(a2.max())))
    got = prepare(piece, "vllm_cutlass", inputs="shard", **shard).tensors
    assert torch.equal(got["w13_input_scale"], a13[ids].amax(dim=1))
    assert torch.equal(got["w2_input_scale"], a2[ids])


def test_a_whole_layer_input_shard_is_the_whole_layer():
    layer = random_layer(3, 64, 128, seed=2)
    for backend in BACKENDS:
        assert_same_tensors(prepare(layer, backend, inputs="shard").tensors, prepare(layer, backend).tensors)


SHARD = {"tp_rank": 1, "tp_size": 2, "ep_rank": 1, "ep_size": 2}


def _piece() -> dict[str, torch.Tensor]:
    """The input shard of rank (tp 1 of 2, ep 1 of 2) of a 4-expert layer with H = 64, I = 256 (Il = 128)."""
    return spec_input_shard(random_layer(4, 64, 256, seed=9), "swiglu", 1, 2, spec_expert_ids(4, 1, 2, "linear"))


def _bad(name: str, change) -> dict[str, torch.Tensor]:
    piece = _piece()
    piece[name] = change(piece[name])
    return piece


@pytest.mark.parametrize("piece, field, expected", [
    # The whole layer's weights sent as the input shard of ep_rank 1 of 2: four experts, not two.
    (spec_input_shard(random_layer(4, 64, 256, seed=9), "swiglu", 0, 1, [0, 1, 2, 3]), "w13_weight",
     "[2, N1, H/2]: the 2 experts that ep_rank 1 of ep_size 2"),
    (_bad("w2_weight", lambda t: torch.cat([t, t], dim=2)), "w2_weight", "[2, 64, 64]"),
    (_bad("w13_weight_scale", lambda t: t[:, :-16]), "w13_weight_scale", "[2, 256, 4]"),
    (_bad("w2_weight_scale", lambda t: t[:, :, :4]), "w2_weight_scale", "[2, 64, 8]"),
    # Per-expert global weight scales of the whole layer, or input scales of the rank only.
    (_bad("w13_weight_scale_2", lambda t: torch.cat([t, t])), "w13_weight_scale_2", "[2] or [2, 2]"),
    (_bad("w2_weight_scale_2", lambda t: torch.cat([t, t])), "w2_weight_scale_2", "[2]"),
    (_bad("w13_input_scale", lambda t: t[2:]), "w13_input_scale", "[4] or [4, 2]"),
    (_bad("w2_input_scale", lambda t: t.reshape(2, 2)), "w2_input_scale", "the input scales of every expert"),
    # Input scales of only the rank's two experts: a two-expert layer, whose ep_rank 1 holds one expert.
    (_bad("w2_input_scale", lambda t: t[2:]), "w13_weight", "[1, N1, H/2]"),
])
def test_input_shards_of_the_wrong_shape_are_refused_naming_the_field(piece, field, expected):
    with pytest.raises(PrepError) as caught:
        prepare(piece, "flashinfer_cutlass", inputs="shard", **SHARD)
    assert caught.value.field == field, caught.value
    assert expected in caught.value.expected, caught.value


def test_unknown_inputs_and_bad_coordinates_are_refused_by_name():
    with pytest.raises(PrepError) as caught:
        prepare(_piece(), "flashinfer_cutlass", inputs="rank", **SHARD)
    assert caught.value.field == "inputs" and "layer, shard" in caught.value.expected
    with pytest.raises(PrepError) as caught:
        prepare(_piece(), "flashinfer_cutlass", inputs="shard", **{**SHARD, "ep_size": 5})
    assert caught.value.field == "ep_size"
    with pytest.raises(PrepError) as caught:
        cut_shard(random_layer(4, 64, 256), tp_size=3)
    assert caught.value.field == "tp_size"
    # The rank's I / tp_size must meet the backend's alignment: Il = 32 breaks the seed CuteDSL I % 64.
    piece = spec_input_shard(random_layer(2, 64, 64), "swiglu", 0, 2, [0, 1])
    with pytest.raises(PrepError) as caught:
        prepare(piece, "flashinfer_cutedsl", inputs="shard", tp_size=2)
    assert caught.value.field == "tp_size"
