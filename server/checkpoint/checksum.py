"""CRC32C of tensor bytes, the per-tensor checksum of the prepared-checkpoint manifest."""

from __future__ import annotations

import crc32c
import torch

CHUNK_BYTES = 64 << 20


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (a view where it already is one)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def crc32c_hex(data: torch.Tensor) -> str:
    """CRC32C of a flat uint8 tensor, as 8 hex digits."""
    return f"{crc32c_update(0, data):08x}"


def crc32c_update(crc: int, data: torch.Tensor) -> int:
    """Extends ``crc`` over a flat uint8 tensor, chunk by chunk."""
    array = data.numpy()
    for start in range(0, array.size, CHUNK_BYTES):
        crc = crc32c.crc32c(array[start:start + CHUNK_BYTES], value=crc)
    return crc
