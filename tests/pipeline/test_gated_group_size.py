"""CuteDSL gated_group_size 16 (SPEC section 10): P3 with 16-row groups, against the SPEC formula written here
and, where the installed FlashInfer has it, FlashInfer 0.7.4's own interleave_cute_dsl_moe_weights."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.pipeline import PrepError, prepare, unprepare
from tests.helpers.layer_factory import random_layer, read_tags, tagged_layer
from tests.helpers.pipeline_reference import as_bytes, assert_same_tensors, reference_prepare, swizzle, to_up_gate

BACKEND = "flashinfer_cutedsl"


def p3(n1: int, group: int) -> list[int]:
    """SPEC P3 with ``group`` for 64: b = r // 2g, h = (r // g) % 2, j = r % g, out[r] = in[h*N1/2 + g*b + j]."""
    return [((r // group) % 2) * (n1 // 2) + group * (r // (2 * group)) + r % group for r in range(n1)]


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
@pytest.mark.parametrize("inter", [16, 48, 128])
def test_rows_follow_p3_with_16(activation, inter):
    prepared = prepare(tagged_layer(2, 64, inter, activation), BACKEND, activation, gated_group_size=16)
    up_gate = [f"u{i}" for i in range(inter)] + [f"g{i}" for i in range(inter)]
    want = [up_gate[src] for src in p3(2 * inter, 16)]
    for expert in range(2):
        assert read_tags(prepared.tensors["w13_weight"][expert]) == want


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
@pytest.mark.parametrize("experts, hidden, inter", [(1, 64, 16), (3, 256, 48), (2, 512, 128)])
def test_matches_reference_and_round_trips(activation, experts, hidden, inter):
    layer = random_layer(experts, hidden, inter, seed=hidden + inter)
    prepared = prepare(layer, BACKEND, activation, gated_group_size=16)
    assert_same_tensors(prepared.tensors, reference_prepare(layer, BACKEND, activation, group=16))
    restored = unprepare(prepared.tensors, prepared.layout)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(as_bytes(restored[name]), as_bytes(layer[name])), name


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
def test_matches_flashinfer_074(activation):
    prepare_module = pytest.importorskip("flashinfer.fused_moe.prepare")
    if not hasattr(prepare_module, "interleave_cute_dsl_moe_weights"):
        pytest.skip("the installed FlashInfer predates 0.7.4's interleave_cute_dsl_moe_weights")
    layer = random_layer(3, 256, 48, seed=5)
    w13 = to_up_gate(layer["w13_weight"], activation)
    s13 = to_up_gate(layer["w13_weight_scale"].view(torch.uint8), activation)
    w13, s13 = prepare_module.interleave_cute_dsl_moe_weights(w13, s13, swap_ab=True)
    prepared = prepare(layer, BACKEND, activation, gated_group_size=16)
    assert torch.equal(prepared.tensors["w13_weight"], w13)
    assert torch.equal(as_bytes(prepared.tensors["w13_weight_scale"]), swizzle(s13))


def test_16_accepts_what_64_refuses_and_is_recorded():
    layer = random_layer(1, 128, 48)
    with pytest.raises(PrepError) as caught:
        prepare(layer, BACKEND)
    assert caught.value.field == "w2_weight" and "I % 64" in str(caught.value)
    record = prepare(layer, BACKEND, gated_group_size=16).layout
    assert record["gated_group_size"] == 16 and record["flashinfer_release"] == "0.7.4"
    assert "/fi0.7.4/" in record["layout_id"] and "/g16/" in record["layout_id"]


def test_non_gated_bytes_do_not_depend_on_the_group():
    layer = random_layer(2, 128, 48, gated=False)
    assert_same_tensors(prepare(layer, BACKEND, "relu2", gated_group_size=16).tensors,
                        prepare(layer, BACKEND, "relu2").tensors)
