"""The two NVFP4 weight recipes: how each tool derives the global scale, the block scales and the divisor.

A weight group (one expert's gate and up rows together, or its down rows: both tools give gate and up one
shared global scale) of dtype D (bf16, fp16 or fp32) with absolute maximum ``amax``; ``bamax`` is the
absolute maximum of a block of 16 consecutive values of a row. Every value is then divided by the block's
divisor in float32 and rounded to E2M1 (``e2m1``). The recipes differ in the formulas and in the precision
each step runs in:

ModelOpt 0.47, ``NVFP4_DEFAULT_CFG`` (``NVFP4QTensor.get_weights_scaling_factor[_2]``, ``quantize``):
  ``weight_scale_2 = f32(amax) / 2688`` (2688 = 6 * 448), float32.
  ``s = f32(bamax) / (6 * weight_scale_2)`` in float32; ``s == 0`` -> 1.0; clamped to ``[2**-9, 448]``;
  then rounded to float8_e4m3fn (nearest, ties to even).
  divisor ``= f32(s) * weight_scale_2``.
  An all-zero group has ``weight_scale_2 = 0`` and NaN block scales there: refused (``ZeroWeight``).

compressed-tensors 0.19 as llm-compressor 0.14 drives it (``generate_gparam``, ``calculate_qparams``,
``_quantize``):
  ``weight_global_scale = f32(2688 * (1 / max(amax, tiny_D)))``: the reciprocal and the product are each
  rounded to D (``2688 / tensor`` is ``tensor.reciprocal() * 2688`` in torch), so in a bf16 model it
  carries bf16's 8 significant bits; a NaN or infinite result (an all-zero group, or a product beyond D's
  range) becomes 1.0.
  ``s = weight_global_scale * f32(bamax / 6)``: the block maximum over 6 is rounded to D first, the
  product is float32; clamped to ``[-448, 448]``, rounded to float8_e4m3fn; ``s == 0`` -> 0.125.
  divisor ``= f32(s) / weight_global_scale``; values are clamped to [-6, 6] (which the rounding does anyway).

Stacked layers (SPEC section 2) hold ModelOpt's form: ``weight_scale_2`` itself, or
``1 / weight_global_scale`` (float32 reciprocal) for compressed-tensors, as ``assemble_layer`` reads it.
"""

from __future__ import annotations

import torch

from nvfp4_prep.contract.layout import QUANTIZE_RECIPES

# The contract's one list of recipes, under the names this package's code uses.
RECIPES = QUANTIZE_RECIPES
MODELOPT, LLM_COMPRESSOR = QUANTIZE_RECIPES

E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_RANGE = E2M1_MAX * E4M3_MAX  # 2688
# ModelOpt's floor for a block scale: float8_e4m3fn's smallest subnormal, so that no block scale is 0x00.
MODELOPT_MIN_BLOCK_SCALE = 2.0**-9
# compressed-tensors' replacement for a zero float8_e4m3fn block scale (``_get_dtype_eps``).
CT_ZERO_BLOCK_SCALE = 0.125
BLOCK = 16


class ZeroWeight(Exception):
    """A weight group whose global scale the recipe cannot form (ModelOpt: all zero); ``index`` is its batch
    position."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _fp8(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float8_e4m3fn)


def global_scales(recipe: str, amax: torch.Tensor) -> torch.Tensor:
    """float32 stored global scale of each group from its ``amax`` (dtype of the weights): ModelOpt's
    ``weight_scale_2`` or compressed-tensors' ``weight_global_scale``."""
    if recipe == MODELOPT:
        # A tensor divisor: CUDA divides by a Python number as a product with its reciprocal, which differs
        # from IEEE division (and from the shared ModelOpt checkpoints) for some amax values.
        amax32 = amax.to(torch.float32)
        scale = amax32 / torch.full_like(amax32, GLOBAL_RANGE)
        zero = (amax == 0).nonzero()
        if zero.numel():
            raise ZeroWeight(int(zero[0, 0]) if zero.dim() > 1 else int(zero[0]))
        return scale
    clamped = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    scale = clamped.reciprocal() * GLOBAL_RANGE
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)


def block_scales(recipe: str, block_amax: torch.Tensor, stored_global: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn block scales ``[B, rows, K/16]`` from ``block_amax`` (dtype of the weights) and the
    stored global scales ``[B]``."""
    glob = stored_global.reshape(-1, *([1] * (block_amax.dim() - 1)))
    if recipe == MODELOPT:
        scale = block_amax.to(torch.float32) / (E2M1_MAX * glob)
        scale = scale.masked_fill(scale == 0, 1.0)
        return _fp8(scale.clamp(min=MODELOPT_MIN_BLOCK_SCALE, max=E4M3_MAX))
    six = torch.tensor(E2M1_MAX, dtype=block_amax.dtype, device=block_amax.device)
    scale = glob * (block_amax / six)
    rounded = _fp8(scale.clamp(min=-E4M3_MAX, max=E4M3_MAX)).to(torch.float32)
    return _fp8(rounded.masked_fill(rounded == 0, CT_ZERO_BLOCK_SCALE))


def divisors(recipe: str, block_scale: torch.Tensor, stored_global: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, rows, K/16]``: what each value of a block is divided by before rounding."""
    glob = stored_global.reshape(-1, *([1] * (block_scale.dim() - 1)))
    scale = block_scale.to(torch.float32)
    return scale * glob if recipe == MODELOPT else scale / glob


def weight_scale_2(recipe: str, stored_global: torch.Tensor) -> torch.Tensor:
    """The stacked form's global weight scale (ModelOpt's form) of a stored global scale."""
    return stored_global.clone() if recipe == MODELOPT else torch.reciprocal(stored_global)


def input_scale_from_global(global_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt-form input scale of a compressed-tensors ``input_global_scale``: its float32 reciprocal, the
    reading vLLM and ``assemble_layer`` apply."""
    return torch.reciprocal(global_scale.to(torch.float32))


def input_global_from_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors ``input_global_scale`` for a ModelOpt ``input_scale`` (``amax / 2688``): the activation
    amax ``scale * 2688`` in the model's dtype, then ``generate_gparam``'s formula as for weights."""
    amax = (scale.to(torch.float32) * GLOBAL_RANGE).to(dtype)
    return global_scales(LLM_COMPRESSOR, amax)

