"""Content identity of streamed tensors, for the prepared-layer cache.

Each chunk is hashed with SHA-256 on a shared thread pool while the receive
loop carries on (hashlib releases the GIL), and the layer's identity is the
hash of the tensor headers and the ordered chunk digests. A strong hash, since
a collision would hand one client another's prepared weights.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from nvfp4_prep.wire import TensorSpec

# Chunks hashed ahead of the receive loop at most; bounds the bytes held only for hashing.
_MAX_PENDING = 16


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class ContentHasher:
    def __init__(self, pool: ThreadPoolExecutor, specs: Sequence[TensorSpec], form: int) -> None:
        self._pool = pool
        self._total = hashlib.sha256()
        self._total.update(repr((form, [(s.name, str(s.dtype), s.shape) for s in specs])).encode())
        self._pending: deque[Future] = deque()

    def add(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(_digest, data))
        while len(self._pending) > _MAX_PENDING:
            self._total.update(self._pending.popleft().result())

    def hexdigest(self) -> str:
        while self._pending:
            self._total.update(self._pending.popleft().result())
        return "sha256:" + self._total.hexdigest()
