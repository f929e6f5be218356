"""A tensor's bytes as a flat uint8 CPU tensor: what is checksummed, framed and written."""

from __future__ import annotations

import torch


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` in row-major order as a flat uint8 tensor on the CPU.

    A view where the tensor already is contiguous on the CPU, a copy otherwise. Goes through ``reshape(-1)``
    first, so that sizes of 1 (an expert count of one) with any stride never reach ``view``.
    """
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
