"""Profile vllm-0.33 (SPEC section 10) against the independent formulation of vLLM 0.33.0's steps."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.contract.layout import BACKENDS, PREPARED_NAMES, STACKED_NAMES, backend_activations, layout_id
from nvfp4_prep.pipeline import PrepError, assemble_layer, prepare, unprepare
from tests.helpers.layer_factory import random_layer, read_tags, tagged_layer
from tests.helpers.pipeline_reference import GATED, as_bytes, assert_same_tensors, ceil_to, reference_prepare

PROFILE = "vllm-0.33"
# (E, H, I): no padding anywhere, then sizes that vLLM 0.33.0 pads (H 384 or 2880, I 96, 160 or 720).
SHAPES = [(3, 256, 128), (8, 512, 64), (2, 384, 96), (1, 2880, 160), (4, 384, 720)]


def shape_runs(backend: str, activation: str, inter: int) -> bool:
    """vLLM 0.33.0 refuses a gated CUTLASS layer whose 2I is not a multiple of 128 (NotImplementedError)."""
    return not (backend in ("flashinfer_cutlass", "vllm_cutlass") and GATED[activation] and (2 * inter) % 128)


CASES = [(backend, activation, *shape) for backend in BACKENDS for activation in backend_activations(PROFILE, backend)
         for shape in SHAPES if shape_runs(backend, activation, shape[2])]


@pytest.mark.parametrize("backend, activation, experts, hidden, inter", CASES)
def test_matches_vllm_033_formulation(backend, activation, experts, hidden, inter):
    layer = random_layer(experts, hidden, inter, GATED[activation], seed=experts + hidden + inter,
                         shared_gate_up_scales=False)
    prepared = prepare(layer, backend, activation, profile=PROFILE)
    assert set(prepared.tensors) == set(PREPARED_NAMES)
    assert_same_tensors(prepared.tensors, reference_prepare(layer, backend, activation, PROFILE))
    # vLLM's experts fuse the input scales into the global weight scales: g1/g2_alphas alias them.
    assert torch.equal(prepared.tensors["w13_weight_scale_2"], prepared.tensors["g1_alphas"])
    assert torch.equal(prepared.tensors["w2_weight_scale_2"], prepared.tensors["g2_alphas"])

    restored = unprepare(prepared.tensors, prepared.layout)
    assert set(restored) == set(STACKED_NAMES)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(as_bytes(restored[name]), as_bytes(layer[name])), name
    # The fused global scales come back divided by the input scales: within one float32 rounding of the source.
    ws13 = layer["w13_weight_scale_2"][:, 0] if GATED[activation] else layer["w13_weight_scale_2"]
    torch.testing.assert_close(restored["w13_weight_scale_2"], ws13, rtol=2**-22, atol=0)
    torch.testing.assert_close(restored["w2_weight_scale_2"], layer["w2_weight_scale_2"], rtol=2**-22, atol=0)


@pytest.mark.parametrize("gated", [True, False])
def test_cutedsl_records_what_vllm_leaves_in_moe_config(gated):
    hidden, inter = 384, 96
    activation = "swiglu" if gated else "relu2"
    prepared = prepare(random_layer(2, hidden, inter, gated), "flashinfer_cutedsl", activation, profile=PROFILE)
    inter_p = ceil_to(inter, 64 if gated else 128)
    record = prepared.layout
    assert record["engine_config"] == {"hidden_dim": 512, "hidden_dim_unpadded": hidden,
                                       "intermediate_size_per_partition": inter_p}
    assert (record["hidden_dim"], record["intermediate_dim"]) == (512, inter_p)
    assert record["padding_fill_byte"] == 0 and record["hidden_alignment"] == 256
    assert record["profile"] == PROFILE and record["flashinfer_release"] == "0.7.2.post1"
    assert record["layout_id"] == layout_id("flashinfer_cutedsl", profile=PROFILE, activation=activation)
    assert prepared.tensors["w13_weight"].shape == (2, 2 * inter_p if gated else inter_p, 256)


def test_cutlass_records_no_padded_sizes_like_vllm():
    prepared = prepare(random_layer(2, 384, 96, gated=False), "flashinfer_cutlass", "relu2", profile=PROFILE)
    # FusedMoEConfig's defaults stay: the unpadded sizes (tests/pipeline/test_vllm_reference.py checks vLLM's)
    assert prepared.layout["engine_config"] == {"hidden_dim": 384, "hidden_dim_unpadded": 384,
                                                "intermediate_size_per_partition": 96}
    assert prepared.layout["intermediate_dim"] == 128  # the bytes are padded all the same


def test_swigluoai_rows_per_backend():
    """SPEC section 10: CuteDSL de-interleaves, FlashInfer CUTLASS swaps halves of interleaved rows, vLLM CUTLASS
    keeps them; swigluoai_uninterleave rows are [gate; up]."""
    inter = 128
    layer = tagged_layer(1, 256, inter, "swigluoai")
    rows = {b: read_tags(prepare(layer, b, "swigluoai", profile=PROFILE).tensors["w13_weight"][0])
            for b in ("flashinfer_cutedsl", "flashinfer_cutlass", "vllm_cutlass")}
    assert rows["flashinfer_cutedsl"][:2] + rows["flashinfer_cutedsl"][64:66] == ["u0", "u1", "g0", "g1"]
    assert rows["flashinfer_cutlass"][:4] == ["g64", "u64", "g65", "u65"]
    assert rows["flashinfer_cutlass"][inter:inter + 2] == ["g0", "u0"]
    assert rows["vllm_cutlass"][:4] == ["g0", "u0", "g1", "u1"]
    packed = tagged_layer(1, 256, inter, "swigluoai_uninterleave")
    for backend in ("flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl", "vllm_cutlass"):
        got = prepare(packed, backend, "swigluoai_uninterleave", profile=PROFILE).tensors["w13_weight"]
        assert torch.equal(got, prepare(packed, backend, "swiglu", profile=PROFILE).tensors["w13_weight"]), backend


def test_seed_bytes_are_unchanged_by_naming_the_profile():
    layer = random_layer(2, 256, 128)
    for backend in BACKENDS:
        assert_same_tensors(prepare(layer, backend, profile="seed").tensors, prepare(layer, backend).tensors)


@pytest.mark.parametrize("kwargs, field, fragment", [
    ({"backend": "flashinfer_trtllm", "activation": "swigluoai", "profile": PROFILE}, "activation",
     "swigluoai_uninterleave"),
    ({"backend": "flashinfer_cutlass", "activation": "swigluoai_uninterleave"}, "activation", "profile 'seed'"),
    ({"backend": "flashinfer_cutlass", "profile": "vllm-0.34"}, "profile", "vllm-0.33"),
    ({"backend": "flashinfer_cutlass", "activation": "gelu", "profile": PROFILE}, "activation", "relu2"),
    ({"backend": "flashinfer_cutedsl", "profile": PROFILE, "gated_group_size": 16}, "gated_group_size", "64"),
    ({"backend": "flashinfer_cutlass", "gated_group_size": 16}, "gated_group_size", "flashinfer_cutedsl"),
    ({"backend": "flashinfer_cutedsl", "gated_group_size": 32}, "gated_group_size", "64 or 16"),
    ({"backend": "flashinfer_cutedsl", "gated_group_size": True}, "gated_group_size", "64 or 16"),
])
def test_combinations_vllm_does_not_run_are_refused(kwargs, field, fragment):
    kwargs = dict(kwargs)
    backend = kwargs.pop("backend")
    with pytest.raises(PrepError) as caught:
        prepare(random_layer(1, 256, 128), backend, **kwargs)
    assert caught.value.field == field and fragment in str(caught.value)


@pytest.mark.parametrize("backend", ["flashinfer_cutlass", "vllm_cutlass"])
def test_cutlass_gated_misaligned_is_refused(backend):
    with pytest.raises(PrepError) as caught:
        prepare(random_layer(1, 256, 96), backend, profile=PROFILE)
    assert caught.value.field == "w13_weight" and "N1 % 128" in str(caught.value)


def test_cutedsl_pads_where_the_seed_refuses():
    layer = random_layer(1, 256, 96)
    with pytest.raises(PrepError) as caught:
        prepare(layer, "flashinfer_cutedsl")
    assert caught.value.field == "w2_weight"
    assert prepare(layer, "flashinfer_cutedsl", profile=PROFILE).layout["intermediate_dim"] == 128


def test_layout_id_names_every_choice():
    assert layout_id("flashinfer_cutedsl", profile=PROFILE, tp_rank=0, tp_size=2, ep_rank=1, ep_size=4) == (
        "flashinfer_cutedsl/vllm-0.33/fi0.7.2.post1/swiglu/max/g64/t128/sf16/p1/tp0of2/ep1of4-linear")
    base = layout_id("flashinfer_cutedsl")
    assert base == "flashinfer_cutedsl/seed/fi0.7.2.post1/swiglu/max/g64/t128/sf16/p1"
    variants = [layout_id("flashinfer_cutedsl", **change) for change in (
        {"profile": PROFILE}, {"activation": "relu2"}, {"policy": "strict"}, {"gated_group_size": 16},
        {"tp_size": 2}, {"ep_size": 2}, {"ep_size": 2, "expert_placement": "round_robin"})]
    assert len({base, *variants}) == 1 + len(variants)
    assert "/fi0.7.4/" in layout_id("flashinfer_cutedsl", gated_group_size=16)


def test_old_records_without_profile_or_shard_still_unprepare():
    layer = random_layer(2, 256, 128)
    prepared = prepare(layer, "flashinfer_trtllm")
    new_keys = ("profile", "flashinfer_release", "gated_group_size", "padding_fill_byte", "hidden_alignment",
                "intermediate_alignment", "tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement",
                "global_num_experts", "expert_ids")
    old = {key: value for key, value in prepared.layout.items() if key not in new_keys}
    assert torch.equal(unprepare(prepared.tensors, old)["w13_weight"], layer["w13_weight"])
    with pytest.raises(PrepError) as caught:
        unprepare(prepared.tensors, old, profile=PROFILE)
    assert caught.value.field == "profile"


def test_assembled_uninterleaved_rows_are_gate_then_up(per_expert):
    layer = random_layer(2, 64, 64)
    experts = per_expert(layer)
    assert_same_tensors(assemble_layer(experts, "swigluoai_uninterleave"), assemble_layer(experts, "swiglu"))
    interleaved = assemble_layer(experts, "swigluoai")["w13_weight"]
    assert torch.equal(interleaved[:, 0::2], layer["w13_weight"][:, :64])
