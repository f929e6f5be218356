"""Admission estimates: the bytes a request will hold, known from its header, match what prepare makes."""

from __future__ import annotations

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.server.estimate import prepared_bytes, reservation_bytes
from nvfp4_prep.wire import header_for, read_headers

# Valid for every backend, and padded by some: H to 512 (trtllm), I to 256 or 384 (non-gated).
SHAPES = [(2, 256, 128), (3, 400, 192), (2, 272, 320)]


def specs_of(tensors):
    return read_headers([header_for(name, t) for name, t in tensors.items()], "t")


@pytest.mark.parametrize("experts, hidden, inter", SHAPES)
@pytest.mark.parametrize("activation", pipeline.ACTIVATIONS)
@pytest.mark.parametrize("backend", pipeline.BACKENDS)
def test_prepared_bytes_equal_the_pipelines_output(make_layer, per_expert, backend, activation, experts, hidden,
                                                   inter):
    layer = make_layer(experts=experts, hidden=hidden, inter=inter, activation=activation)
    prepared = pipeline.prepare(layer, backend, activation)
    made = sum(t.numel() * t.element_size() for t in prepared.tensors.values())
    assert prepared_bytes(specs_of(layer), False, backend, activation) == made
    if activation != "relu2":
        assert prepared_bytes(specs_of(per_expert(layer)), True, backend, activation) == made


def test_reservation_covers_inputs_assembly_and_outputs(make_layer, per_expert):
    layer = make_layer(experts=2)
    inputs = sum(t.numel() * t.element_size() for t in layer.values())
    outputs = prepared_bytes(specs_of(layer), False, "flashinfer_trtllm", "swiglu")
    assert reservation_bytes(specs_of(layer), False, "flashinfer_trtllm", "swiglu") == inputs + outputs
    experts = per_expert(layer)
    expert_inputs = sum(t.numel() * t.element_size() for t in experts.values())
    assert reservation_bytes(specs_of(experts), True, "flashinfer_trtllm", "swiglu") == 2 * expert_inputs + outputs


def test_malformed_shapes_fall_back_to_the_inputs(make_layer):
    layer = make_layer()
    del layer["w2_weight"]
    inputs = sum(t.numel() * t.element_size() for t in layer.values())
    assert prepared_bytes(specs_of(layer), False, "flashinfer_cutlass", "swiglu") is None
    assert reservation_bytes(specs_of(layer), False, "flashinfer_cutlass", "swiglu") == 2 * inputs
