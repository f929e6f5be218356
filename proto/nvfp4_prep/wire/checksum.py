"""CRC32C (Castagnoli) of chunk bytes.

Uses the ``crc32c`` package: hardware-accelerated, accepts any buffer (bytes,
memoryview, numpy array) and releases the GIL, so chunks are checked where
they lie, without copying them into ``bytes`` first, while other streams run.
"""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data) -> int:
    """CRC32C of a bytes-like object."""
    return _crc32c.crc32c(data)
