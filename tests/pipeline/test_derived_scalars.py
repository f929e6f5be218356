"""SPEC section 6: derived scalars that overflow (or underflow to zero) are refused, naming their input."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, STACKED_NAMES
from nvfp4_prep.pipeline import PrepError, prepare
from tests.helpers.layer_factory import random_layer
from tests.helpers.pipeline_reference import GATED


def layer_with(activation: str = "swiglu", experts: int = 2, **values: float) -> dict[str, torch.Tensor]:
    layer = random_layer(experts, 256, 128, GATED[activation], seed=2)
    for name, value in values.items():
        layer[name] = torch.full_like(layer[name], value)
    return layer


def refused(layer: dict, backend: str, activation: str = "swiglu") -> PrepError:
    with pytest.raises(PrepError) as caught:
        prepare(layer, backend, activation)
    assert caught.value.expected and "finite" in caught.value.expected
    return caught.value


@pytest.mark.parametrize("experts", [1, 2])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_input_scales_give_infinite_reciprocals(backend, activation, experts):
    error = refused(layer_with(activation, experts, w2_input_scale=1e-45), backend, activation)
    assert error.field == "w2_input_scale" and "a2_gscale = inf" in str(error)
    error = refused(layer_with(activation, experts, w13_input_scale=1e-45), backend, activation)
    assert error.field == "w13_input_scale" and "a1_gscale = inf" in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_weight_scales_give_infinite_alphas(backend):
    error = refused(layer_with(w13_weight_scale_2=3e38, w13_input_scale=3e38), backend)
    assert error.field == "w13_weight_scale_2" and "g1_alphas = inf" in str(error)
    error = refused(layer_with(w13_weight_scale_2=3e38, w13_input_scale=2.0), backend)
    assert error.field == "w13_weight_scale_2" and "g1_alphas = inf" in str(error)
    error = refused(layer_with(w2_weight_scale_2=2.0, w2_input_scale=3e38), backend)
    assert error.field == "w2_input_scale" and "g2_alphas = inf" in str(error)
    error = refused(layer_with(w2_weight_scale_2=3e38, w2_input_scale=3e38), backend)
    assert error.field == "w2_weight_scale_2" and "g2_alphas = inf" in str(error)


def test_product_underflowing_to_zero_names_the_smaller_factor():
    error = refused(layer_with(w13_weight_scale_2=1e-30, w13_input_scale=1e-20), "flashinfer_cutlass")
    assert error.field == "w13_weight_scale_2" and "g1_alphas = 0.0" in str(error)


def test_gated_scale_c_overflow_names_its_largest_factor():
    # g1_alphas = 3e38 * 1 is finite, 1 / w2_input_scale = 4 too, their product is not.
    error = refused(layer_with(w13_weight_scale_2=3e38, w13_input_scale=1.0, w2_input_scale=0.25),
                    "flashinfer_trtllm")
    assert error.field == "w13_weight_scale_2" and "g1_scale_c = inf" in str(error)
    # Non-gated layers send a2_gscale as g1_scale_c: the same inputs are fine.
    prepare(layer_with("relu2", w13_weight_scale_2=3e38, w13_input_scale=1.0, w2_input_scale=0.25),
            "flashinfer_trtllm", "relu2")


def test_per_expert_backend_names_the_expert():
    layer = random_layer(3, 256, 128, seed=4)
    layer["w2_input_scale"][2] = 1e-45
    error = refused(layer, "vllm_cutlass")
    assert error.field == "w2_input_scale" and "expert 2" in str(error)


def test_extreme_but_finite_scales_are_accepted():
    prepared = prepare(layer_with(w13_weight_scale_2=1e18, w13_input_scale=1e18, w2_input_scale=0.5,
                                  w2_weight_scale_2=1e-30), "flashinfer_cutlass")
    for name in ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "g1_scale_c"):
        assert bool(torch.isfinite(prepared.tensors[name]).all()), name


@pytest.mark.parametrize("extra", ["bogus", "w13_weight_scale_3", "model.layers.0.mlp.experts.w13_weight"])
def test_unknown_stacked_tensor_is_rejected_by_name(extra):
    layer = random_layer(2, 256, 128, seed=1)
    layer[extra] = torch.zeros(4)
    with pytest.raises(PrepError) as caught:
        prepare(layer, "flashinfer_cutlass")
    assert caught.value.field == extra and extra in str(caught.value)
    assert all(name in caught.value.expected for name in STACKED_NAMES)
