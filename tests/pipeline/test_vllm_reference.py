"""vLLM 0.33.0's own preparation code (run on CPU in .venv-vllm) against SPEC section 10 and our pipeline.

1. vLLM runs, or refuses where SPEC section 10 says it does, for every backend x activation over shapes that
   need no padding and shapes that do; the sizes it records are SPEC's.
2. Where SPEC section 10 says ``vllm-0.33`` equals ``seed``, vLLM's bytes equal our seed pipeline's; and for
   every combination, the ``vllm-0.33`` profile's bytes equal vLLM's (refused where vLLM refuses).
3. The harness's CPU stand-ins for FlashInfer's CUDA-only helpers equal vLLM's own ``swizzle_blockscale``,
   SPEC section 9 and FlashInfer's ``convert_sf_to_mma_layout``.
"""

from __future__ import annotations

import math

import pytest
import torch
from flashinfer.cute_dsl.utils import convert_sf_to_mma_layout

from nvfp4_prep.pipeline import PrepError, prepare
from tests.helpers.layer_factory import random_layer
from tests.helpers.vllm_reference import VllmRefused, vllm_prepare, vllm_swizzle
from tests.reference.stand_ins import p4_interleave, p8_view

BACKENDS = ("flashinfer_cutedsl", "flashinfer_cutlass", "flashinfer_trtllm", "vllm_cutlass")
ACTIVATIONS = ("swiglu", "swigluoai", "swigluoai_uninterleave", "relu2")
CUTLASS = ("flashinfer_cutlass", "vllm_cutlass")
PADDED_BY_VLLM = ("flashinfer_cutedsl", "flashinfer_trtllm")  # H to 256, I to 64 (gated) or 128
# (experts, hidden, intermediate): the first three need no padding on any backend.
UNPADDED = {"E2-H512-I128": (2, 512, 128), "E1-H256-I256": (1, 256, 256), "E8-H256-I128": (8, 256, 128)}
PADDED = {"E3-H384-I96": (3, 384, 96), "E1-H2880-I160": (1, 2880, 160), "E8-H384-I720": (8, 384, 720),
          "E2-H2880-I720": (2, 2880, 720)}
SHAPES = {**UNPADDED, **PADDED}
CASES = [(shape, backend, activation) for shape in SHAPES for backend in BACKENDS for activation in ACTIVATIONS]
# SPEC section 10: where vllm-0.33 is seed. CuteDSL only where nothing pads (seed refuses what vLLM pads).
SEED_EQUAL = [(s, b, a) for s, b, a in CASES
              if (b != "flashinfer_cutedsl" and a in ("swiglu", "relu2"))
              or (b == "flashinfer_cutedsl" and s in UNPADDED and a in ("swiglu", "swigluoai", "relu2"))]


def ceil_to(x: int, m: int) -> int:
    return math.ceil(x / m) * m


def layer_for(shape: str, activation: str) -> dict[str, torch.Tensor]:
    experts, hidden, inter = SHAPES[shape]
    # Unequal gate/up scales on the padded shapes: both sides then take gate's weight scale and the max input scale.
    return random_layer(experts, hidden, inter, gated=activation != "relu2", seed=hidden + inter + experts,
                        shared_gate_up_scales=shape in UNPADDED)


_results: dict[tuple[str, str, str], tuple[dict, dict] | VllmRefused] = {}


def vllm_result(shape: str, backend: str, activation: str) -> tuple[dict, dict] | VllmRefused:
    """vLLM's answer for one case, computed once per session (tests 1 and 2 share it)."""
    key = (shape, backend, activation)
    if key not in _results:
        try:
            _results[key] = vllm_prepare(layer_for(shape, activation), backend, activation)
        except VllmRefused as refusal:
            _results[key] = refusal
    return _results[key]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], names: dict[str, str]) -> list[str]:
    """For each vLLM name -> our name: a line per tensor whose shape, dtype or bytes differ."""
    found = []
    for their_name, our_name in names.items():
        a, b = ours.get(our_name), theirs[their_name]
        if a is None:
            found.append(f"{our_name}: missing from ours (vLLM has {their_name} {tuple(b.shape)} {b.dtype})")
        elif a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{our_name} vs vLLM {their_name}: ours {tuple(a.shape)} {a.dtype}, "
                         f"vLLM {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(as_bytes(a), as_bytes(b)):
            diff = (as_bytes(a) != as_bytes(b)).nonzero().reshape(-1)
            first = int(diff[0]) // a.element_size()
            found.append(f"{our_name} vs vLLM {their_name}: {diff.numel()} bytes differ, first at element "
                         f"{first} (ours {a.reshape(-1)[first].item()}, vLLM {b.reshape(-1)[first].item()})")
    return found


def expect_refusal(shape: str, backend: str, activation: str) -> bool:
    """SPEC section 10: TRT-LLM refuses interleaved swigluoai; the CUTLASS backends refuse gated N1 % 128 != 0."""
    inter = SHAPES[shape][2]
    if backend == "flashinfer_trtllm" and activation == "swigluoai":
        return True
    return backend in CUTLASS and activation != "relu2" and (2 * inter) % 128 != 0


@pytest.mark.parametrize(("shape", "backend", "activation"), CASES)
def test_vllm_runs_or_refuses_as_spec_says(shape: str, backend: str, activation: str) -> None:
    experts, hidden, inter = SHAPES[shape]
    result = vllm_result(shape, backend, activation)
    if isinstance(result, VllmRefused):
        assert "current device" not in str(result)  # the CPU stand-ins never cause a refusal
        assert expect_refusal(shape, backend, activation), f"vLLM refused: {result}"
        return
    assert not expect_refusal(shape, backend, activation), "vLLM ran a combination SPEC section 10 says it refuses"
    out, attrs = result
    gated = activation != "relu2"
    assert attrs["is_act_and_mul"] == gated
    assert out["w13_weight"].dtype == out["w2_weight"].dtype == torch.uint8
    assert out["w13_weight_scale"].dtype == out["w2_weight_scale"].dtype == torch.float8_e4m3fn
    # SPEC section 10: the weight scales end fused with the input scales, equal to g1_alphas and g2_alphas.
    assert torch.equal(as_bytes(out["w13_weight_scale_2"]), as_bytes(out["g1_alphas"]))
    assert torch.equal(as_bytes(out["w2_weight_scale_2"]), as_bytes(out["g2_alphas"]))
    if backend in PADDED_BY_VLLM:
        inter_p = ceil_to(inter, 64 if gated else 128)
        assert (attrs["hidden_dim"], attrs["hidden_dim_unpadded"]) == (ceil_to(hidden, 256), hidden)
        assert attrs["intermediate_size_per_partition"] == inter_p
        assert out["w2_weight"].shape == (experts, ceil_to(hidden, 256), inter_p // 2)
    else:  # nothing updates the sizes; FusedMoEConfig itself sets hidden_dim_unpadded = hidden_dim
        assert (attrs["hidden_dim"], attrs["hidden_dim_unpadded"]) == (hidden, hidden)
        assert attrs["intermediate_size_per_partition"] == inter
    if backend == "flashinfer_cutedsl":  # the kernel's view aliases the layer's P4 bytes (SPEC P8)
        for name, param in (("w1_scale", "w13_weight_scale"), ("w2_scale", "w2_weight_scale")):
            scale = out[param]
            view = convert_sf_to_mma_layout(scale.reshape(-1, scale.shape[2]), m=scale.shape[1],
                                            k=scale.shape[2] * 16, num_groups=scale.shape[0])
            assert attrs[f"{name}_view_shape"] == list(view.shape)
            assert attrs[f"{name}_view_stride"] == list(view.stride())
            assert attrs[f"{name}_view_aliases_layer"]


# vLLM's name -> ours, where the seed keeps the unfused weight scales (SPEC section 10, every backend).
SEED_NAMES = {
    "w13_weight": "w13_weight", "w13_weight_scale": "w13_weight_scale", "w13_input_scale": "w13_input_scale",
    "w2_weight": "w2_weight", "w2_weight_scale": "w2_weight_scale", "w2_input_scale": "w2_input_scale",
    "w13_weight_scale_2": "g1_alphas", "w2_weight_scale_2": "g2_alphas",
    "g1_alphas": "g1_alphas", "g2_alphas": "g2_alphas", "a1_gscale": "a1_gscale", "a2_gscale": "a2_gscale",
}


@pytest.mark.parametrize(("shape", "backend", "activation"), SEED_EQUAL)
def test_seed_equals_vllm_where_spec_says_so(shape: str, backend: str, activation: str) -> None:
    result = vllm_result(shape, backend, activation)
    layer = layer_for(shape, activation)
    if isinstance(result, VllmRefused):
        with pytest.raises(PrepError):
            prepare(layer, backend, activation)
        return
    theirs, _ = result
    ours = prepare(layer, backend, activation).tensors
    names = {**SEED_NAMES, **({"g1_scale_c": "g1_scale_c"} if "g1_scale_c" in theirs else {})}
    assert differences(ours, theirs, names) == []


@pytest.mark.parametrize(("shape", "backend", "activation"), CASES)
def test_vllm_profile_equals_vllm(shape: str, backend: str, activation: str) -> None:
    result = vllm_result(shape, backend, activation)
    layer = layer_for(shape, activation)
    if isinstance(result, VllmRefused):
        with pytest.raises(PrepError):
            prepare(layer, backend, activation, profile="vllm-0.33")
        return
    theirs, attrs = result
    prepared = prepare(layer, backend, activation, profile="vllm-0.33")
    assert differences(prepared.tensors, theirs, {name: name for name in theirs}) == []
    # The sizes the layout record says vLLM keeps on its layer are the ones vLLM kept.
    assert prepared.layout["engine_config"] == {name: attrs[name] for name in prepared.layout["engine_config"]}


SCALE_SHAPES = [(2, 100, 6), (3, 256, 32), (1, 96, 24), (2, 1440, 180), (256, 16), (100, 6)]


def test_p4_stand_in_equals_vllm_swizzle_blockscale() -> None:
    """Replacement 4 (FlashInfer's CUDA block_scale_interleave) against vLLM's own pure-torch swizzle."""
    gen = torch.Generator().manual_seed(11)
    scales = {f"s{i}": torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
              for i, shape in enumerate(SCALE_SHAPES)}
    swizzled = vllm_swizzle(scales)
    for name, scale in scales.items():
        rows, cols = scale.shape[-2:]
        expected_size = (scale.shape[0] if scale.dim() == 3 else 1) * ceil_to(rows, 128) * ceil_to(cols, 4)
        assert swizzled[f"{name}.vllm"].numel() == expected_size
        assert torch.equal(as_bytes(swizzled[f"{name}.p4"]), as_bytes(swizzled[f"{name}.vllm"])), name


def test_p4_stand_in_meets_spec_vectors() -> None:
    rows, cols = 256, 32
    ids = torch.arange(1, rows * cols + 1, dtype=torch.int32).view(rows, cols)
    flat = p4_interleave(ids)
    for (m, k), off in {(0, 0): 0, (0, 3): 3, (0, 4): 512, (1, 0): 16, (31, 0): 496, (32, 0): 4, (96, 3): 15,
                        (127, 31): 4095, (128, 0): 4096, (255, 31): 8191}.items():
        assert int(flat[off]) == int(ids[m, k]), (m, k)
    small = p4_interleave(torch.ones(100, 6, dtype=torch.int32))
    assert small.numel() == 1024 and int((small == 0).sum()) == 424


def test_p8_stand_in_is_flashinfers_view() -> None:
    """Replacement 5 against SPEC section 9 and FlashInfer's convert_sf_to_mma_layout (same code in 0.7.2.post1)."""
    scale = torch.arange(2 * 256 * 32, dtype=torch.int32).view(2, 256, 32)
    view = p8_view(scale)
    assert tuple(view.shape) == (32, 4, 2, 4, 8, 2)
    assert view.stride() == (16, 4, 4096, 1, 512, 8192)
    assert view.data_ptr() == scale.data_ptr()
    theirs = convert_sf_to_mma_layout(scale.reshape(512, 32), m=256, k=512, num_groups=2)
    assert theirs.shape == view.shape and theirs.stride() == view.stride() and torch.equal(theirs, view)
