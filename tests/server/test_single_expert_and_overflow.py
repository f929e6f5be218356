"""Through a real server and the SDK: a layer of one expert prepares, and overflowing scalars are refused."""

from __future__ import annotations

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient, PrepInvalidArgument
from nvfp4_prep.contract import layout


@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_one_expert_is_bit_exact_on_every_backend(prep_address, make_layer, same_tensors, backend, activation):
    layer = make_layer(experts=1, activation=activation, seed=3)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, backend, activation)
    want = pipeline.prepare(layer, backend, activation)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout and got.layout["num_experts"] == 1
    restored = pipeline.unprepare(got.tensors, got.layout)
    for name in ("w13_weight", "w2_weight", "w2_weight_scale_2"):
        assert torch.equal(restored[name], layer[name]), name


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_one_expert_in_the_per_expert_form(prep_address, make_layer, per_expert, same_tensors, fmt):
    stacked = make_layer(experts=1)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(per_expert(stacked, fmt), "flashinfer_trtllm")
    want = pipeline.prepare(pipeline.assemble_layer(per_expert(stacked, fmt)), "flashinfer_trtllm")
    same_tensors(got.tensors, want.tensors)


def _with(layer: dict[str, torch.Tensor], **values: float) -> dict[str, torch.Tensor]:
    for name, value in values.items():
        layer[name] = torch.full_like(layer[name], value)
    return layer


OVERFLOWS = {
    "tiny w2 input scale": ({"w2_input_scale": 1e-45}, "flashinfer_cutlass", "w2_input_scale"),
    "tiny w13 input scale": ({"w13_input_scale": 1e-45}, "flashinfer_trtllm", "w13_input_scale"),
    "huge w13 weight scales": ({"w13_weight_scale_2": 3e38, "w13_input_scale": 3e38}, "vllm_cutlass",
                               "w13_weight_scale_2"),
    "huge w2 weight scales": ({"w2_weight_scale_2": 3e38, "w2_input_scale": 3e38}, "flashinfer_cutedsl",
                              "w2_weight_scale_2"),
}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_overflowing_derived_scalars_are_invalid_argument(prep_address, make_layer, case):
    values, backend, field = OVERFLOWS[case]
    layer = _with(make_layer(), **values)
    with pytest.raises(pipeline.PrepError) as caught:
        pipeline.prepare(layer, backend)
    assert caught.value.field == field
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, backend)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field and "finite" in info.value.details


def test_unknown_stacked_tensor_is_invalid_argument(prep_address, make_layer):
    layer = make_layer()
    layer["bogus"] = torch.zeros(4)
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, "flashinfer_cutlass")
    assert info.value.field == "bogus" and "bogus" in info.value.details
