"""A layer of one expert (E = 1): size-1 dimensions may carry any stride, and every output must still frame."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, PREPARED_NAMES
from nvfp4_prep.contract.tensor_bytes import byte_view
from nvfp4_prep.pipeline import assemble_layer, prepare, unprepare
from nvfp4_prep.wire.framing import tensor_bytes
from tests.conftest import split_experts
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import GATED
from tests.pipeline.test_reference import assert_matches_reference, assert_round_trip


def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def odd_strides(tensor: torch.Tensor) -> torch.Tensor:
    """The same values with a stride of 0 on every size-1 dimension (what ``expand`` and ``t[:, 0]`` give)."""
    base = tensor.contiguous()
    strides = tuple(0 if size == 1 else stride for size, stride in zip(base.shape, base.stride(), strict=True))
    return base.as_strided(base.shape, strides)


def assert_frameable(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        assert tensor.stride() == row_major(tuple(tensor.shape)), name
        data = byte_view(tensor)
        assert data.numel() == tensor.numel() * tensor.element_size(), name
        assert len(tensor_bytes(tensor, name)) == data.numel(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_matches_reference_round_trips_and_frames(backend, activation):
    layer = random_layer(1, 256, 128, GATED[activation], seed=11)
    assert_matches_reference(layer, backend, activation)
    assert_round_trip(layer, backend, activation)
    prepared = prepare(layer, backend, activation)
    assert set(prepared.tensors) == set(PREPARED_NAMES)
    assert_frameable(prepared.tensors)
    assert_frameable(unprepare(prepared.tensors, prepared.layout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["max", "strict"])
def test_one_expert_with_odd_input_strides(backend, policy):
    layer = random_layer(1, 256, 128, seed=5, shared_gate_up_scales=True)
    odd = {name: odd_strides(tensor) for name, tensor in layer.items()}
    assert any(odd[name].stride() != layer[name].stride() for name in layer)
    want = prepare(layer, backend, input_scale_policy=policy)
    got = prepare(odd, backend, input_scale_policy=policy)
    assert_frameable(got.tensors)
    for name, tensor in want.tensors.items():
        assert torch.equal(byte_view(got.tensors[name]), byte_view(tensor)), name
    restored = unprepare({name: odd_strides(t) for name, t in got.tensors.items()}, got.layout)
    assert_frameable(restored)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "w2_weight_scale_2"):
        assert torch.equal(byte_view(restored[name]), byte_view(layer[name])), name


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_expert_through_assemble_layer(backend, fmt):
    stacked = random_layer(1, 256, 128, seed=7)
    assembled = assemble_layer(split_experts(stacked, fmt))
    assert {name: tuple(t.shape) for name, t in assembled.items()} == {n: tuple(t.shape) for n, t in stacked.items()}
    prepared = prepare(assembled, backend)
    assert_frameable(prepared.tensors)
    restored = unprepare(prepared.tensors, prepared.layout)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(byte_view(restored[name]), byte_view(stacked[name])), name
    if fmt == "modelopt":
        assert_matches_reference(assembled, backend, "swiglu")
