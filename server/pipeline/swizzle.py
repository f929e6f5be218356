"""SPEC P4 (128x4 block-scale tiling) and P8 (CuteDSL MMA view)."""

from __future__ import annotations

import torch

from .errors import PrepError
from .layout import round_up

TILE_ROWS = 128
TILE_COLS = 4


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


def mma_view(scale: torch.Tensor) -> torch.Tensor:
    """P8: the CuteDSL MMA view of prepared ``[E, Mp, Kp]`` scales, without copying.

    Shape ``(32, 4, Mp/128, 4, Kp/4, E)``; a view cannot cross the wire, so
    the SDK rebuilds it from the received bytes.
    """
    if scale.dim() != 3:
        raise PrepError("scale", f"has shape {tuple(scale.shape)}", "a 3-D [E, Mp, Kp] tiled scale tensor")
    experts, rows, cols = scale.shape
    if rows % TILE_ROWS or cols % TILE_COLS:
        raise PrepError("scale", f"has shape {tuple(scale.shape)}", "Mp a multiple of 128 and Kp of 4")
    if not scale.is_contiguous():
        raise PrepError("scale", "is not contiguous", "the contiguous tiled bytes")
    tiles = scale.view(experts, rows // 128, cols // 4, 32, 4, 4)
    return tiles.permute(3, 4, 1, 5, 2, 0)
