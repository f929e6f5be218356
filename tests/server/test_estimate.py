"""Admission estimates: the bytes a request will hold, known from its header, match what prepare makes."""

from __future__ import annotations

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.contract import layout
from nvfp4_prep.server.estimate import prepared_bytes, reservation_bytes
from nvfp4_prep.wire import header_for, read_headers

# Valid for every backend, and padded by some: H to 512 (trtllm), I to 256 or 384 (non-gated).
SHAPES = [(2, 256, 128), (3, 400, 192), (2, 272, 320)]


def specs_of(tensors):
    return read_headers([header_for(name, t) for name, t in tensors.items()], "t")


def non_gated_per_expert(stacked):
    """The per-expert tensors of a relu2 layer: an up projection (its only first projection) and a down one."""
    out = {}
    for e in range(stacked["w13_weight"].shape[0]):
        for proj, prefix in (("up_proj", "w13"), ("down_proj", "w2")):
            out[f"{e}.{proj}.weight"] = stacked[f"{prefix}_weight"][e].clone()
            out[f"{e}.{proj}.weight_scale"] = stacked[f"{prefix}_weight_scale"][e].clone()
            out[f"{e}.{proj}.weight_scale_2"] = stacked[f"{prefix}_weight_scale_2"][e].reshape(()).clone()
            out[f"{e}.{proj}.input_scale"] = stacked[f"{prefix}_input_scale"][e].reshape(()).clone()
    return out


@pytest.mark.parametrize("experts, hidden, inter", SHAPES)
@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_prepared_bytes_equal_the_pipelines_output(make_layer, per_expert, backend, activation, experts, hidden,
                                                   inter):
    layer = make_layer(experts=experts, hidden=hidden, inter=inter, activation=activation)
    prepared = pipeline.prepare(layer, backend, activation)
    made = sum(t.numel() * t.element_size() for t in prepared.tensors.values())
    assert prepared_bytes(specs_of(layer), False, backend, activation) == made
    experts = per_expert(layer) if activation != "relu2" else non_gated_per_expert(layer)
    # What the server prepares from per-expert tensors: the layer assembled from them.
    assembled = pipeline.prepare(pipeline.assemble_layer(experts, activation), backend, activation)
    made_from_experts = sum(t.numel() * t.element_size() for t in assembled.tensors.values())
    assert prepared_bytes(specs_of(experts), True, backend, activation) == made_from_experts == made


def test_reservation_covers_inputs_assembly_and_outputs(make_layer, per_expert):
    layer = make_layer(experts=2)
    inputs = sum(t.numel() * t.element_size() for t in layer.values())
    outputs = prepared_bytes(specs_of(layer), False, "flashinfer_trtllm", "swiglu")
    assert reservation_bytes(specs_of(layer), False, "flashinfer_trtllm", "swiglu") == inputs + outputs
    experts = per_expert(layer)
    expert_inputs = sum(t.numel() * t.element_size() for t in experts.values())
    assert reservation_bytes(specs_of(experts), True, "flashinfer_trtllm", "swiglu") == 2 * expert_inputs + outputs


def test_relu2_per_expert_reservation_covers_what_the_layer_holds(make_layer):
    layer = make_layer(experts=2, hidden=256, inter=16, activation="relu2")
    experts = non_gated_per_expert(layer)
    inputs = sum(t.numel() * t.element_size() for t in experts.values())
    prepared = pipeline.prepare(pipeline.assemble_layer(experts, "relu2"), "flashinfer_cutlass", "relu2")
    outputs = sum(t.numel() * t.element_size() for t in prepared.tensors.values())
    assert reservation_bytes(specs_of(experts), True, "flashinfer_cutlass", "relu2") == 2 * inputs + outputs


def test_malformed_shapes_fall_back_to_the_inputs(make_layer):
    layer = make_layer()
    del layer["w2_weight"]
    inputs = sum(t.numel() * t.element_size() for t in layer.values())
    assert prepared_bytes(specs_of(layer), False, "flashinfer_cutlass", "swiglu") is None
    assert reservation_bytes(specs_of(layer), False, "flashinfer_cutlass", "swiglu") == 2 * inputs


@pytest.mark.parametrize("backend", layout.BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_vllm_profile_paddings_are_estimated(make_layer, backend, activation):
    """vLLM 0.33.0 pads CuteDSL layers (I to 64/128, H to 256) that seed refuses: admission must count them."""
    layer = make_layer(experts=2, hidden=384, inter=192, activation=activation)  # CuteDSL: H to 512, relu2 I to 256
    prepared = pipeline.prepare(layer, backend, activation, profile="vllm-0.33")
    assert prepared.layout["hidden_dim"] > 384 or backend != "flashinfer_cutedsl"
    made = sum(t.numel() * t.element_size() for t in prepared.tensors.values())
    assert prepared_bytes(specs_of(layer), False, backend, activation, "vllm-0.33") == made
