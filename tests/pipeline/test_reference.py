"""The pipeline against the independent vLLM-style formulation, and round trips through unprepare."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, PREPARED_NAMES, STACKED_NAMES, layout_id
from nvfp4_prep.pipeline import prepare, unprepare
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import GATED, reference_prepare


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def assert_matches_reference(layer: dict, backend: str, activation: str) -> None:
    prepared = prepare(layer, backend, activation)
    expected = reference_prepare(layer, backend, activation)
    assert set(prepared.tensors) == set(PREPARED_NAMES)
    for name, want in expected.items():
        got = prepared.tensors[name]
        assert tuple(got.shape) == tuple(want.shape), name
        assert torch.equal(as_bytes(got), as_bytes(want)), name
    for name in ("w13_weight", "w2_weight"):
        assert prepared.tensors[name].dtype == torch.uint8
    for name in ("w13_weight_scale", "w2_weight_scale"):
        assert prepared.tensors[name].dtype == torch.float8_e4m3fn
    for name in set(PREPARED_NAMES) - {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"}:
        assert prepared.tensors[name].dtype == torch.float32, name


def assert_round_trip(layer: dict, backend: str, activation: str) -> None:
    prepared = prepare(layer, backend, activation)
    restored = unprepare(prepared.tensors, prepared.layout)
    assert set(restored) == set(STACKED_NAMES)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert restored[name].dtype == layer[name].dtype, name
        assert torch.equal(as_bytes(restored[name]), as_bytes(layer[name])), name
    ws13 = layer["w13_weight_scale_2"]
    assert torch.equal(restored["w13_weight_scale_2"], ws13[:, 0] if ws13.dim() == 2 else ws13)
    assert torch.equal(restored["w2_weight_scale_2"], layer["w2_weight_scale_2"])


# Shapes that every backend accepts: H % 16, I % 64 (CuteDSL), 2I % 128 (CUTLASS).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("experts, hidden, inter", [(3, 256, 128), (2, 512, 192), (1, 144, 64)])
def test_matches_reference_and_round_trips(backend, activation, experts, hidden, inter):
    layer = random_layer(experts, hidden, inter, GATED[activation], seed=experts * hidden + inter)
    assert_matches_reference(layer, backend, activation)
    assert_round_trip(layer, backend, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden, inter", [(400, 80), (272, 208), (16, 16)])
def test_trtllm_padding_matches_reference(activation, hidden, inter):
    layer = random_layer(2, hidden, inter, GATED[activation], seed=hidden)
    assert_matches_reference(layer, "flashinfer_trtllm", activation)
    assert_round_trip(layer, "flashinfer_trtllm", activation)


@pytest.mark.parametrize("backend", ["flashinfer_cutlass", "vllm_cutlass", "flashinfer_cutedsl"])
@pytest.mark.parametrize("inter", [16, 48, 208])
def test_non_gated_odd_sizes_match_reference(backend, inter):
    layer = random_layer(2, 48, inter, gated=False, seed=inter)
    assert_matches_reference(layer, backend, "relu2")
    assert_round_trip(layer, backend, "relu2")


def test_per_expert_input_scales_and_layout_record():
    layer = random_layer(4, 256, 128, seed=9, shared_gate_up_scales=False)
    for backend in BACKENDS:
        prepared = prepare(layer, backend)
        assert prepared.layout["layout_id"] == layout_id(backend)
        assert prepared.layout["backend"] == backend and prepared.layout["num_experts"] == 4
        assert prepared.layout["epilogue_tile_m"] == 128 and prepared.layout["sf_vec_size"] == 16
    assert_matches_reference(layer, "vllm_cutlass", "swiglu")
    assert_matches_reference(layer, "flashinfer_cutedsl", "swiglu")


def layer_shapes(draw, backend: str, activation: str) -> tuple[int, int, int]:
    gated = GATED[activation]
    experts = draw(st.integers(1, 4))
    hidden = 16 * draw(st.integers(1, 24))
    if backend == "flashinfer_cutedsl" and gated:
        inter = 64 * draw(st.integers(1, 4))
    elif backend in ("flashinfer_cutlass", "vllm_cutlass") and gated:
        inter = 64 * draw(st.integers(1, 4))
    else:
        inter = 16 * draw(st.integers(1, 16))
    return experts, hidden, inter


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    activation = draw(st.sampled_from(ACTIVATIONS))
    experts, hidden, inter = layer_shapes(draw, backend, activation)
    seed = draw(st.integers(0, 2**16))
    return backend, activation, random_layer(experts, hidden, inter, GATED[activation], seed=seed,
                                             shared_gate_up_scales=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_property_reference_round_trip_and_padding(case):
    backend, activation, layer = case
    assert_matches_reference(layer, backend, activation)
    assert_round_trip(layer, backend, activation)
