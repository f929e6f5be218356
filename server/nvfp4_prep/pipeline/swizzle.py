"""SPEC P4: 128x4 block-scale tiling (P8, the view of its bytes, is in ``nvfp4_prep.contract``)."""

from __future__ import annotations

import torch

from nvfp4_prep.contract.mma_view import TILE_COLS, TILE_ROWS

from .layout import round_up


def tiled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Rows and columns of one expert's tiled scale matrix, padding included."""
    return round_up(rows, TILE_ROWS), round_up(cols, TILE_COLS)


def tile_offsets(rows: int, cols: int, cols_padded: int | None = None) -> torch.Tensor:
    """``off(m, k)`` for every ``m < rows``, ``k < cols`` as a ``[rows, cols]`` long tensor.

    ``cols_padded`` is the tiled width Kp when the matrix is also zero-padded
    beyond ``cols`` (TRT-LLM and non-gated CUTLASS padding of I).
    """
    cols_padded = cols_padded if cols_padded is not None else tiled_shape(rows, cols)[1]
    m = torch.arange(rows, dtype=torch.long).unsqueeze(1)
    k = torch.arange(cols, dtype=torch.long).unsqueeze(0)
    return (
        ((m // 128) * (cols_padded // 4) + k // 4) * 512
        + (m % 32) * 16
        + ((m % 128) // 32) * 4
        + k % 4
    )
