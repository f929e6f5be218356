"""Prepared-layer cache: a repeated request streams stored responses instead of recomputing.

Keyed by the identity of the source (a content hash of the streamed tensors,
or the checkpoint's own identity for references) and every parameter that
changes the output bytes. Bounded in bytes with least-recently-used eviction.
``hits``, ``misses``, ``evictions``, ``bytes`` and ``entries`` are plain
attributes for metrics.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from nvfp4_prep.v1 import prep_pb2 as pb


@dataclass(frozen=True)
class CacheKey:
    source: str
    backend: str
    activation: str
    input_scale_policy: str
    layout_id: str
    pipeline_version: str


@dataclass(frozen=True)
class CachedLayer:
    """One prepared layer as sent: its header and its encoded chunk messages, ready to send again."""

    header: pb.PreparedHeader
    chunks: tuple[bytes, ...]
    nbytes: int


class PreparedCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, CachedLayer] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.capacity

    def get(self, key: CacheKey) -> CachedLayer | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: CacheKey, entry: CachedLayer) -> bool:
        """Stores ``entry``, evicting the least recently used; False when it can never fit."""
        if not self.fits(entry.nbytes):
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self.bytes + entry.nbytes > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += entry.nbytes
            return True
