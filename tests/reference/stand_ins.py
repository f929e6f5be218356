"""CPU equivalents of the two CUDA-only FlashInfer helpers vLLM's NVFP4 MoE preparation calls.

Pure torch, importable in both environments: the vLLM harness (``vllm_moe``) runs them in place of
FlashInfer's, and the main suite checks them against SPEC section 9 and FlashInfer's own view helper.
"""

from __future__ import annotations

import math

import torch


def p4_interleave(scale: torch.Tensor) -> torch.Tensor:
    """SPEC P4 by its offset formula, as FlashInfer's ``nvfp4_block_scale_interleave`` returns it: flat, zero-filled.

    ``scale`` is ``[M, K]`` or ``[E, M, K]``; the result has ``E * Mp * Kp`` elements, expert e from ``e*Mp*Kp``.
    """
    experts = scale.shape[0] if scale.dim() == 3 else 1
    rows, cols = scale.shape[-2:]
    rows_p, cols_p = math.ceil(rows / 128) * 128, math.ceil(cols / 4) * 4
    m = torch.arange(rows).view(-1, 1)
    k = torch.arange(cols).view(1, -1)
    off = ((m // 128) * (cols_p // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
    out = torch.zeros(experts, rows_p * cols_p, dtype=scale.dtype)
    out[:, off.reshape(-1)] = scale.reshape(experts, rows * cols)
    return out.reshape(-1)


def p8_view(scale: torch.Tensor) -> torch.Tensor:
    """SPEC P8: P4 bytes ``[E, Mp, Kp]`` viewed as ``(32, 4, Mp/128, 4, Kp/4, E)``; a view of ``scale``, no copy."""
    experts, rows_p, cols_p = scale.shape
    return scale.view(experts, rows_p // 128, cols_p // 4, 32, 4, 4).permute(3, 4, 1, 5, 2, 0)
