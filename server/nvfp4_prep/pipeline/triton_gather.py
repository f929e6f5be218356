"""Triton kernels for GatherPlan on CUDA: one coalesced pass, padding written as zeros.

Used when the tensors live on a CUDA device and Triton imports; everywhere
else (CPU, CI) the torch path in ``gather.py`` writes the same bytes.

Each program moves about 32 KiB: a block of whole rows for weights (a W2 row
of a DeepSeek layer is only 1 KiB, and one program per row left the copy
engines' worth of bandwidth to launch overhead), and for block scales a band
of 128 rows by a few tile columns, read row-wise and written tile-wise with
the 128x4 permutation done in registers, so that neither side is a 4-byte
scatter.
"""

from __future__ import annotations

import torch

from .plan import GatherPlan

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton
    triton = None

BLOCK_WORDS = 4096  # words per program: 32 KiB of int64 weight words
MAX_ROW_BLOCK = 512
FLAT_BLOCK = 1024
TILE_COLS_PER_PROGRAM = 32  # 128 x 32 quads = 16 KiB of scales


def available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _gather_rows(out_ptr, in_ptr, src_ptr, total_rows, out_rows, in_rows, in_cols, out_cols,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        inside = rows < total_rows
        expert = rows // out_rows
        source = tl.load(src_ptr + rows % out_rows, mask=inside, other=-1)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        values = tl.load(in_ptr + ((expert * in_rows + source) * in_cols)[:, None] + cols[None, :],
                         mask=(source >= 0)[:, None] & (cols < in_cols)[None, :], other=0)
        tl.store(out_ptr + (rows * out_cols)[:, None] + cols[None, :], values,
                 mask=inside[:, None] & (cols < out_cols)[None, :])

    @triton.jit
    def _gather_flat(out_ptr, in_ptr, src_ptr, out_len, in_len, BLOCK: tl.constexpr):
        expert = tl.program_id(1).to(tl.int64)
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = index < out_len
        source = tl.load(src_ptr + index, mask=inside, other=-1)
        values = tl.load(in_ptr + expert * in_len + source, mask=inside & (source >= 0), other=0)
        tl.store(out_ptr + expert * out_len + index, values, mask=inside)

    @triton.jit
    def _tile_scales(out_ptr, in_ptr, rows_ptr, in_len, words_per_row, bands, col_tiles, KB: tl.constexpr):
        band = tl.program_id(0)
        expert = tl.program_id(2).to(tl.int64)
        row = tl.arange(0, 128)
        source = tl.load(rows_ptr + band * 128 + row)
        cols = tl.program_id(1) * KB + tl.arange(0, KB)
        quads = tl.load(in_ptr + expert * in_len + (source * words_per_row)[:, None] + cols[None, :],
                        mask=(source >= 0)[:, None] & (cols < words_per_row)[None, :], other=0)
        # Row 32 i + j of the band goes to word j * 4 + i of its tile: [i, j, k] -> [k, j, i].
        tiled = tl.reshape(tl.permute(tl.reshape(quads, (4, 32, KB)), (2, 1, 0)), (KB, 128))
        tile = (expert * bands + band) * col_tiles + cols
        tl.store(out_ptr + (tile * 128)[:, None] + tl.arange(0, 128)[None, :], tiled,
                 mask=(cols < col_tiles)[:, None])


def gather(plan: GatherPlan, src_map: torch.Tensor, source: torch.Tensor, out: torch.Tensor) -> None:
    """``out[e, r, :] = source[e, src_map[r], :]`` zero-padded; word tensors ``[E, rows, cols]``."""
    experts, out_rows, out_cols = out.shape
    _, in_rows, in_cols = source.shape
    if plan.tiles is not None:
        tiles = plan.tiles
        bands = len(tiles.rows) // 128
        grid = (bands, triton.cdiv(tiles.col_tiles, TILE_COLS_PER_PROGRAM), experts)
        _tile_scales[grid](out, source, plan.tile_rows(source.device), in_rows, tiles.words_per_row, bands,
                           tiles.col_tiles, KB=TILE_COLS_PER_PROGRAM, num_warps=8)
    elif out_cols == 1 and in_cols == 1:
        grid = (triton.cdiv(out_rows, FLAT_BLOCK), experts)
        _gather_flat[grid](out, source, src_map, out_rows, in_rows, BLOCK=FLAT_BLOCK)
    else:
        block = min(MAX_ROW_BLOCK, triton.next_power_of_2(out_cols))
        rows = max(1, BLOCK_WORDS // block)
        total = experts * out_rows
        grid = (triton.cdiv(total, rows), triton.cdiv(out_cols, block))
        _gather_rows[grid](out, source, src_map, total, out_rows, in_rows, in_cols, out_cols, ROWS=rows, BLOCK=block,
                           num_warps=8)
