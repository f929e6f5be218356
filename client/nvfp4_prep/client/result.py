"""What prepare_layer returns: the prepared tensors, their layout record and derived scalars."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4_prep.contract.mma_view import mma_view


@dataclass
class RemoteLayer:
    """A layer prepared by the server; ``tensors`` and ``layout`` match ``nvfp4_prep.pipeline.prepare``.
    ``request_id`` is the id the call was sent with, which the server's log lines for it carry."""

    tensors: dict[str, torch.Tensor]
    layout: dict
    scalars: dict[str, list[float]]
    cache_hit: bool = False
    request_id: str = ""

    def mma_view(self, name: str = "w13_weight_scale") -> torch.Tensor:
        """The MMA view of the block scales ``name`` (CuteDSL layouts: 3-D ``[E, Mp, Kp]``)."""
        if name not in self.tensors:
            raise KeyError(f"{name}: not a prepared tensor (have {sorted(self.tensors)})")
        return mma_view(self.tensors[name])
