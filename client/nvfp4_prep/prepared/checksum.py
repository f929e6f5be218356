"""CRC32C of tensor bytes, the per-tensor checksum of the prepared-checkpoint manifest."""

from __future__ import annotations

import crc32c
import torch

CHUNK_BYTES = 64 << 20


def crc32c_hex(data: torch.Tensor) -> str:
    """CRC32C of a flat uint8 tensor, as 8 hex digits."""
    return f"{crc32c_update(0, data):08x}"


def crc32c_update(crc: int, data: torch.Tensor) -> int:
    """Extends ``crc`` over a flat uint8 tensor, chunk by chunk."""
    array = data.numpy()
    for start in range(0, array.size, CHUNK_BYTES):
        crc = crc32c.crc32c(array[start:start + CHUNK_BYTES], value=crc)
    return crc
