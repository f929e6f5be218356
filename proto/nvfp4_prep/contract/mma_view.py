"""SPEC P8: the CuteDSL MMA view of tiled block scales. A view cannot cross the wire, so every side that
holds the P4 bytes (the pipeline, the SDK) rebuilds it from them."""

from __future__ import annotations

import torch

from .errors import PrepError

TILE_ROWS = 128
TILE_COLS = 4


def mma_view(scale: torch.Tensor) -> torch.Tensor:
    """The MMA view of prepared ``[E, Mp, Kp]`` scales, without copying: shape ``(32, 4, Mp/128, 4, Kp/4, E)``."""
    if scale.dim() != 3:
        raise PrepError("scale", f"has shape {tuple(scale.shape)}", "a 3-D [E, Mp, Kp] tiled scale tensor")
    experts, rows, cols = scale.shape
    if rows % TILE_ROWS or cols % TILE_COLS:
        raise PrepError("scale", f"has shape {tuple(scale.shape)}", "Mp a multiple of 128 and Kp of 4")
    if not scale.is_contiguous():
        raise PrepError("scale", "is not contiguous", "the contiguous tiled bytes")
    tiles = scale.view(experts, rows // TILE_ROWS, cols // TILE_COLS, 32, 4, 4)
    return tiles.permute(3, 4, 1, 5, 2, 0)
