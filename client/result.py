"""What prepare_layer returns: the prepared tensors, their layout record and derived scalars."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_ROWS = 128
TILE_COLS = 4


def mma_view(scale: torch.Tensor) -> torch.Tensor:
    """SPEC P8: the CuteDSL MMA view of prepared ``[E, Mp, Kp]`` block scales, without copying.

    Shape ``(32, 4, Mp/128, 4, Kp/4, E)`` with element strides
    ``(16, 4, (Kp/4)*512, 1, 512, Mp*Kp)``; a view cannot cross the wire, so the
    SDK rebuilds it over the received bytes.
    """
    if scale.dim() != 3 or scale.shape[1] % TILE_ROWS or scale.shape[2] % TILE_COLS:
        raise ValueError(f"scale: shape {list(scale.shape)} (expected [E, Mp, Kp] with Mp % 128 == 0, Kp % 4 == 0)")
    if not scale.is_contiguous():
        raise ValueError("scale: not contiguous (expected the received tiled bytes)")
    experts, rows, cols = scale.shape
    shape = (32, 4, rows // TILE_ROWS, 4, cols // TILE_COLS, experts)
    strides = (16, 4, (cols // TILE_COLS) * 512, 1, 512, rows * cols)
    return scale.as_strided(shape, strides, scale.storage_offset())


@dataclass
class RemoteLayer:
    """A layer prepared by the server; ``tensors`` and ``layout`` match ``nvfp4_prep.pipeline.prepare``."""

    tensors: dict[str, torch.Tensor]
    layout: dict
    scalars: dict[str, list[float]]
    cache_hit: bool = False

    def mma_view(self, name: str = "w13_weight_scale") -> torch.Tensor:
        """The MMA view of the block scales ``name`` (CuteDSL layouts: 3-D ``[E, Mp, Kp]``)."""
        if name not in self.tensors:
            raise KeyError(f"{name}: not a prepared tensor (have {sorted(self.tensors)})")
        return mma_view(self.tensors[name])
