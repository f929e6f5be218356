"""quantize_layer() and quantized_expert_tensors(): high-precision MoE experts to NVFP4 by a named recipe.

One pass per weight group, on the weights' device, in chunks of experts so that the float32 temporaries
stay bounded: block maxima, the group's global scale (gate and up of an expert share one), block scales,
divisors, E2M1 codes, packed nibbles (``recipes`` gives the formulas). Only elementwise ops, max
reductions and ``bucketize`` run, so CUDA gives the same bytes as the CPU. On CUDA with Triton the two
fused kernels of ``triton_quantize`` write the same bytes (``NVFP4_PREP_QUANTIZE_KERNEL=torch`` forces
this torch path there too); the torch path stays the CPU path and the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.expert_keys import parse_expert_key

from ..validate import check_choice
from . import triton_quantize
from .e2m1 import e2m1_codes, pack_nibbles, unpack_values
from .input_scales import stored_input_scales
from .recipes import (
    BLOCK,
    LLM_COMPRESSOR,
    MODELOPT,
    RECIPES,
    ZeroWeight,
    block_scales,
    divisors,
    global_scales,
    weight_scale_2,
)
from .weights import WEIGHT_DTYPES, ExpertWeights, expert_weights

# "torch" forces the torch path on CUDA too (benchmarks and GPU tests compare both).
_KERNEL = env_value("quantize-kernel", "auto")
# Elements of one chunk of experts: about 1 GiB of float32 for the largest temporary.
CHUNK_ELEMENTS = 1 << 28
# The names each tool stores a projection's tensors under: weight, block scale, global scale, input scale.
TOOL_NAMES = {
    MODELOPT: ("weight", "weight_scale", "weight_scale_2", "input_scale"),
    LLM_COMPRESSOR: ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"),
}
_ZERO_PROBLEM = ("is all zero: ModelOpt 0.47 exports weight_scale_2 = 0 and NaN block scales for it, which no "
                 "engine loads")
_ZERO_EXPECTED = "a weight with a non-zero value, or recipe 'llm-compressor' (global scale 1.0 for an all-zero weight)"


@dataclass
class QuantizedWeights:
    """One stacked weight quantized: packed ``[B, rows, K/2]`` uint8, block scales ``[B, rows, K/16]``
    float8_e4m3fn and the recipe's stored global scale ``[B]`` float32."""

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor


class NonFinite(Exception):
    """A weight group with NaN or infinite values; ``index`` is its batch position, ``row`` the first bad row."""

    def __init__(self, index: int, row: int) -> None:
        super().__init__(index, row)
        self.index = index
        self.row = row


def _checked_global_scales(weights: torch.Tensor, amax: torch.Tensor, recipe: str, start: int) -> torch.Tensor:
    """The stored global scales of groups ``start..`` from their ``amax``; raises ``NonFinite`` or ``ZeroWeight``."""
    finite = torch.isfinite(amax)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        row = int((~torch.isfinite(weights[index])).any(dim=-1).nonzero()[0])
        raise NonFinite(start + index, row)
    try:
        return global_scales(recipe, amax)
    except ZeroWeight as exc:
        raise ZeroWeight(start + exc.index) from None


def _quantize_chunk(weights: torch.Tensor, recipe: str, out: QuantizedWeights, start: int) -> None:
    blocks = weights.unflatten(-1, (-1, BLOCK))
    block_amax = blocks.abs().amax(dim=-1)
    stored = _checked_global_scales(weights, block_amax.amax(dim=(-2, -1)), recipe, start)
    scales = block_scales(recipe, block_amax, stored)
    values = blocks / divisors(recipe, scales, stored).unsqueeze(-1)
    end = start + weights.shape[0]
    out.packed[start:end] = pack_nibbles(e2m1_codes(values.flatten(-2)))
    out.block_scale[start:end] = scales
    out.global_scale[start:end] = stored


def _fused(weights: torch.Tensor) -> bool:
    return _KERNEL != "torch" and triton_quantize.available(weights)


def _fused_globals(weights: torch.Tensor, recipe: str,
                   extrema: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, bool]:
    """The fused path's checked global scales and its choice of division, from the amax pass (``extrema``, or
    run now); raises ``NonFinite`` or ``ZeroWeight``."""
    amax, smallest = extrema if extrema is not None else triton_quantize.group_extrema(weights)
    stored = _checked_global_scales(weights, amax, recipe, 0)
    return stored, triton_quantize.markstein_safe(recipe, stored, smallest)


def _quantize_groups(weights: torch.Tensor, recipe: str, chunk_elements: int,
                     fused: tuple[torch.Tensor, bool] | None) -> QuantizedWeights:
    """``fused``: what ``_fused_globals`` gave, for the Triton path; None runs the torch path. Raises
    ``NonFinite`` or ``ZeroWeight`` (ModelOpt, all-zero group) with the batch position; the callers turn them
    into a PrepError naming the tensor."""
    groups, rows, cols = weights.shape
    out = QuantizedWeights(
        torch.empty((groups, rows, cols // 2), dtype=torch.uint8, device=weights.device),
        torch.empty((groups, rows, cols // BLOCK), dtype=torch.float8_e4m3fn, device=weights.device),
        torch.empty((groups,), dtype=torch.float32, device=weights.device) if fused is None else fused[0],
    )
    if fused is not None:
        triton_quantize.quantize_blocks(weights, recipe, out.global_scale, out.packed, out.block_scale,
                                        markstein=fused[1])
        return out
    step = max(1, chunk_elements // max(1, rows * cols))
    for start in range(0, groups, step):
        _quantize_chunk(weights[start:start + step], recipe, out, start)
    return out


def quantize_weights(weights: torch.Tensor, recipe: str, *, name: str = "weights",
                     chunk_elements: int = CHUNK_ELEMENTS) -> QuantizedWeights:
    """Quantize ``[B, rows, K]`` weights (bf16, fp16 or fp32), one global scale per leading index ``b`` (a
    weight group: give gate and up rows of an expert as one group). ``name`` names the tensor in errors."""
    check_choice("recipe", recipe, RECIPES)
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3 or weights.dtype not in WEIGHT_DTYPES:
        shown = f"{weights.dtype} of shape {list(weights.shape)}" if isinstance(weights, torch.Tensor) else \
            type(weights).__name__
        raise PrepError(name, f"is {shown}", "a 3-D bfloat16, float16 or float32 tensor [B, rows, K]")
    if weights.shape[-1] == 0 or weights.shape[-1] % BLOCK:
        raise PrepError(name, f"has K = {weights.shape[-1]}", f"K a positive multiple of {BLOCK}")
    try:
        return _quantize_groups(weights, recipe, chunk_elements,
                                _fused_globals(weights, recipe) if _fused(weights) else None)
    except NonFinite as exc:
        raise PrepError(f"{name}[{exc.index}]", f"has NaN or infinite values (row {exc.row})",
                        "finite weights to quantize") from None
    except ZeroWeight as exc:
        raise PrepError(f"{name}[{exc.index}]", _ZERO_PROBLEM, _ZERO_EXPECTED) from None


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """float32 values of NVFP4 weights ``[B, rows, K/2]``: ``e2m1 * f32(block_scale) * scale_2[b]`` (SPEC
    section 1, ``scale_2`` in ModelOpt's form)."""
    values = unpack_values(packed).unflatten(-1, (-1, BLOCK))
    scale = block_scale.to(torch.float32) * scale_2.to(torch.float32).reshape(-1, 1, 1)
    return (values * scale.unsqueeze(-1)).flatten(-2)


def _start(layer: ExpertWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Queues the fused path's amax passes of both weights (nothing waits for them yet)."""
    return {which: triton_quantize.group_extrema(weights)
            for which, weights in (("w13", layer.w13), ("w2", layer.w2)) if _fused(weights)}


def _quantized(layer: ExpertWeights, recipe: str, chunk_elements: int,
               started: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> tuple[QuantizedWeights, QuantizedWeights]:
    """Both weights quantized; ``started``: what ``_start`` queued (else queued now). Every check waits for the
    amax passes only, before either quantize pass is queued, so that the device runs them back to back."""
    started = _start(layer) if started is None else started
    names = {"w13": layer.w13_name, "w2": lambda e, _row: layer.w2_name(e)}
    weights = {"w13": layer.w13, "w2": layer.w2}
    fused: dict[str, tuple[torch.Tensor, bool] | None] = {}
    result = []
    which = "w13"
    try:
        for which in weights:
            fused[which] = _fused_globals(weights[which], recipe, started[which]) if which in started else None
        for which in weights:
            result.append(_quantize_groups(weights[which], recipe, chunk_elements, fused[which]))
    except NonFinite as exc:
        raise PrepError(names[which](exc.index, exc.row), "has NaN or infinite values",
                        "finite weights to quantize") from None
    except ZeroWeight as exc:
        together = " (gate and up together, which share one global scale)" if which == "w13" and layer.gated \
            else ""
        raise PrepError(names[which](exc.index, 0), f"{_ZERO_PROBLEM}{together}", _ZERO_EXPECTED) from None
    return result[0], result[1]


def _inputs(layer: ExpertWeights, recipe: str, input_scales: Mapping[str, torch.Tensor] | None
            ) -> dict[str, torch.Tensor]:
    return stored_input_scales(input_scales, recipe, layer.num_experts, layer.roles, layer.w13.dtype,
                               layer.projections)


def quantize_layer(
    weights: Mapping[str, torch.Tensor],
    recipe: str,
    input_scales: Mapping[str, torch.Tensor] | None,
    *,
    activation: str = "swiglu",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """The stacked NVFP4 layer (SPEC section 2, ready for ``prepare``) of high-precision experts.

    ``weights``: ``w13_weight`` ``[E, N1, H]`` and ``w2_weight`` ``[E, H, I]``, or per-expert
    ``<e>.<proj>.weight``. ``recipe``: ``"modelopt"`` or ``"llm-compressor"``. ``input_scales``: see
    ``input_scales`` (required: every backend is W4A4). The result equals ``assemble_layer`` of what the tool
    stores (``quantized_expert_tensors``), byte for byte: global and input scales in ModelOpt's form,
    ``[E, 2]`` (gate, up) when gated.
    """
    check_choice("recipe", recipe, RECIPES)
    layer = expert_weights(weights, activation)
    on_host = _on_host(input_scales)  # tiny copies, before the device has work to wait for
    started = _start(layer)
    inputs = _inputs(layer, recipe, on_host)  # checked on the host while the amax passes run
    w13, w2 = _quantized(layer, recipe, chunk_elements, started)
    device = layer.w13.device
    if recipe == LLM_COMPRESSOR:
        inputs = {role: torch.reciprocal(value) for role, value in inputs.items()}
    ws13 = weight_scale_2(recipe, w13.global_scale)
    w13_roles = layer.roles[:-1]

    def per_w13(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values, dim=1) if layer.gated else values[0].clone()

    return {
        "w13_weight": w13.packed,
        "w13_weight_scale": w13.block_scale,
        "w13_weight_scale_2": per_w13([ws13] * len(w13_roles)),
        "w13_input_scale": _to_device(per_w13([inputs[role] for role in w13_roles]), device),
        "w2_weight": w2.packed,
        "w2_weight_scale": w2.block_scale,
        "w2_weight_scale_2": weight_scale_2(recipe, w2.global_scale),
        "w2_input_scale": _to_device(inputs["down"], device),
    }


def _on_host(scales: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    if not isinstance(scales, Mapping):
        return scales  # stored_input_scales names what is wrong with it
    return {name: value.detach().cpu() if isinstance(value, torch.Tensor) else value for name, value in scales.items()}


def _to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting there for the queued quantize passes (pinned, asynchronous)."""
    return value.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else value.to(device)


def quantized_expert_tensors(
    weights: Mapping[str, torch.Tensor],
    recipe: str,
    input_scales: Mapping[str, torch.Tensor] | None,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Per-expert tensors as the tool stores them, keyed ``<e>.<proj>.<leaf>`` like ``weights``.

    ``weights``: per-expert ``<e>.<proj>.weight`` (gate and up, or one of them for a non-gated layer, and
    down). ModelOpt: ``weight`` uint8 ``[rows, K/2]``, ``weight_scale`` float8_e4m3fn ``[rows, K/16]``,
    ``weight_scale_2`` and ``input_scale`` float32 0-d. compressed-tensors: ``weight_packed``,
    ``weight_scale``, ``weight_global_scale`` and ``input_global_scale`` float32 ``[1]``.
    """
    check_choice("recipe", recipe, RECIPES)
    roles = {parsed.role for parsed in map(parse_expert_key, weights) if parsed is not None}
    layer = expert_weights(weights, "swiglu" if {"gate", "up"} <= roles else "relu2")
    if layer.projections is None:
        raise PrepError("weights", "are in the stacked form", "per-expert '<e>.<proj>.weight' weights")
    inputs = _inputs(layer, recipe, input_scales)
    w13, w2 = _quantized(layer, recipe, chunk_elements)
    leaf_weight, leaf_block, leaf_global, leaf_input = TOOL_NAMES[recipe]
    rows = layer.w13.shape[1] // (len(layer.roles) - 1)

    def scalar(value: torch.Tensor) -> torch.Tensor:
        value = value.to(layer.w13.device)
        return value.reshape(()).clone() if recipe == MODELOPT else value.reshape(1).clone()

    out: dict[str, torch.Tensor] = {}
    for e in range(layer.num_experts):
        parts = [(proj, role, w13, slice(j * rows, (j + 1) * rows))
                 for j, (proj, role) in enumerate(zip(layer.projections[:-1], layer.roles[:-1], strict=True))]
        parts.append((layer.projections[-1], "down", w2, slice(None)))
        for proj, role, quantized, rows_of in parts:
            key = f"{e}.{proj}"
            out[f"{key}.{leaf_weight}"] = quantized.packed[e, rows_of]
            out[f"{key}.{leaf_block}"] = quantized.block_scale[e, rows_of]
            out[f"{key}.{leaf_global}"] = scalar(quantized.global_scale[e])
            out[f"{key}.{leaf_input}"] = scalar(inputs[role][e])
    return out
