"""Triton kernels for GatherPlan on CUDA: one coalesced pass, padding written as zeros.

Used when the tensors live on a CUDA device and Triton imports; everywhere
else (CPU, CI) the torch path in ``gather.py`` writes the same bytes.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

ROW_BLOCK = 512
FLAT_BLOCK = 1024


def available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _gather_rows(out_ptr, in_ptr, src_ptr, out_rows, in_rows, in_cols, out_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        expert = row // out_rows
        source = tl.load(src_ptr + row % out_rows)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        values = tl.load(in_ptr + (expert * in_rows + source) * in_cols + cols,
                         mask=(cols < in_cols) & (source >= 0), other=0)
        tl.store(out_ptr + row * out_cols + cols, values, mask=cols < out_cols)

    @triton.jit
    def _gather_flat(out_ptr, in_ptr, src_ptr, out_len, in_len, BLOCK: tl.constexpr):
        expert = tl.program_id(1).to(tl.int64)
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = index < out_len
        source = tl.load(src_ptr + index, mask=inside, other=-1)
        values = tl.load(in_ptr + expert * in_len + source, mask=inside & (source >= 0), other=0)
        tl.store(out_ptr + expert * out_len + index, values, mask=inside)


def gather(src_map: torch.Tensor, source: torch.Tensor, out: torch.Tensor) -> None:
    """``out[e, r, :] = source[e, src_map[r], :]`` zero-padded; word tensors ``[E, rows, cols]``."""
    experts, out_rows, out_cols = out.shape
    _, in_rows, in_cols = source.shape
    if out_cols == 1 and in_cols == 1:
        grid = (triton.cdiv(out_rows, FLAT_BLOCK), experts)
        _gather_flat[grid](out, source, src_map, out_rows, in_rows, BLOCK=FLAT_BLOCK)
    else:
        grid = (experts * out_rows, triton.cdiv(out_cols, ROW_BLOCK))
        _gather_rows[grid](out, source, src_map, out_rows, in_rows, in_cols, out_cols, BLOCK=ROW_BLOCK)
