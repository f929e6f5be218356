"""The answer of a Prepare call: its header, then the prepared tensors chunk by chunk.

Sends a freshly prepared layer (device-to-host copies overlapped with the network, the encoded chunks
kept for the cache when they fit), one prepared while it arrives (``early_answer``), or replays a cached one;
a whole or cached answer starts at the resume point the request names. Inline, chunks are encoded (CRC32C, then
the one copy into the message) a few at once on the server's pool for chunk work, in order: one thread alone
encodes at about the rate of one TCP stream. Over the bulk connections each chunk is checksummed and written
straight from its buffer on its connection's thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from nvfp4_prep.pipeline import PreparedLayer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import Prefetch, encode_chunk, header_for, layout_to_proto, scalars_to_proto

from .bulk.connection import BulkChannel
from .cache import CachedLayer, CacheKey
from .resources import CallResources
from .resume import START, ResumePoint, bytes_before, read_resume, remaining, renumbered, replay_from
from .staging import PinnedRing
from .worker import DeviceWorker

# Chunks of one answer encoded at once, on the server's pool for chunk work (``hash_pool``, which also hashes
# received chunks for the cache).
ENCODE_DEPTH = 4
# Chunks of one answer being written over its bulk connections at once, each straight from its staging buffer
# (fewer than the ring's slots: the others are copied off the device ahead).
BULK_DEPTH = 6


class Responder:
    """Sends the answer: its header on the gRPC stream, its chunks there too or, when ``bulk`` is set, over the
    call's bulk connections (the stream then ends once every chunk was written)."""

    def __init__(self, header: pb.PrepareHeader, resources: CallResources, summary: dict) -> None:
        self._header = header
        self._resources = resources
        self._summary = summary
        self.bulk: BulkChannel | None = None

    def held(self, cached: bool = False) -> int:
        """How many chunks the answer works on at once (their buffers must stay valid meanwhile): written from
        their buffers over the bulk connections, or encoded on the pool (always when ``cached``)."""
        return BULK_DEPTH if self.bulk is not None and not cached else ENCODE_DEPTH

    def send(self, worker: DeviceWorker, prepared: PreparedLayer, ring: PinnedRing | None, key: CacheKey | None,
             backend: str) -> Iterator[pb.PrepareResponse | bytes]:
        """Streams ``prepared`` (and stores it in the cache under ``key`` when it is sent whole and fits)."""
        names = list(prepared.tensors)
        tensors = [prepared.tensors[name] for name in names]
        header = pb.PreparedHeader(
            layout=layout_to_proto(prepared.layout),
            scalars=scalars_to_proto(prepared.tensors),
            tensors=[header_for(name, tensor) for name, tensor in zip(names, tensors, strict=True)],
        )
        sizes = [t.numel() * t.element_size() for t in tensors]
        total = sum(sizes)
        self._summary["bytes_out"] = total
        point = self._resume_point(sizes)
        cache = self._resources.cache
        kept: list[bytes] | None = [] if key is not None and point == START and cache.fits(total) else None
        del prepared
        yield pb.PrepareResponse(header=header)
        chunks = worker.chunks(remaining(tensors, point), self._resources.chunk_size, ring, self.held(kept is not None))
        copied = _Timed(renumbered(chunks, point))
        try:
            yield from self._chunks(copied, backend, kept)
        finally:
            self._resources.metrics.stage_seconds.labels("device_to_host", backend).observe(copied.seconds)
        self._summary["bytes_sent"] = total - bytes_before(point, sizes)
        if kept is not None:
            cache.put(key, CachedLayer(header, tuple(kept), total))

    def send_early(self, header: pb.PreparedHeader, chunks: Iterator[tuple[int, int, object]],
                   backend: str) -> Iterator[pb.PrepareResponse | bytes]:
        """Streams an answer whose ``chunks`` are prepared while the request still arrives (``early_answer``):
        each buffer stays valid while ``held()`` more chunks are taken. Never cached, never resumed."""
        total = sum(tensor.byte_length for tensor in header.tensors)
        self._summary["bytes_out"] = total
        yield pb.PrepareResponse(header=header)
        yield from self._chunks(chunks, backend, None)
        self._summary["bytes_sent"] = total

    def _chunks(self, chunks: Iterator[tuple[int, int, object]], backend: str,
                kept: list[bytes] | None) -> Iterator[bytes]:
        """The chunks over the bulk connections, written from their buffers (encoded messages when the cache keeps
        them), or encoded on the pool and sent inline (yielded)."""
        if self.bulk is not None and kept is None:
            with self._resources.metrics.stage_timer("send", backend):
                self.bulk.send_pieces(chunks, BULK_DEPTH)
            return
        encoded = Prefetch(_encoded(chunks, self._resources.hash_pool, ENCODE_DEPTH))
        try:
            with self._resources.metrics.stage_timer("send", backend):
                messages = _keeping(encoded, kept)
                if self.bulk is not None:
                    self.bulk.send(messages)
                else:
                    yield from messages
        finally:
            encoded.close()

    def replay(self, cached: CachedLayer) -> Iterator[pb.PrepareResponse | bytes]:
        """Streams a cached answer, marked as a cache hit."""
        self._summary["cache_hit"] = True
        header = pb.PreparedHeader()
        header.CopyFrom(cached.header)
        header.cache_hit = True
        sizes = [tensor.byte_length for tensor in header.tensors]
        point = self._resume_point(sizes)
        yield pb.PrepareResponse(header=header)
        if self.bulk is not None:
            self.bulk.send(replay_from(cached.chunks, point))
        else:
            yield from replay_from(cached.chunks, point)
        self._summary["bytes_sent"] = cached.nbytes - bytes_before(point, sizes)

    def _resume_point(self, sizes: list[int]) -> ResumePoint:
        """Where the answer's chunks start: the request's resume point, checked against the answer."""
        point = read_resume(self._header, sizes)
        if point != START:
            self._summary["resume_from"] = f"{point.tensor_index}:{point.offset}"
        return point


def _encoded(chunks: Iterator[tuple[int, int, object]], pool: ThreadPoolExecutor, depth: int) -> Iterator[bytes]:
    """``encode_chunk`` of each chunk, in order, up to ``depth`` at once on ``pool`` (CRC32C and the join release
    the GIL); a chunk's buffer is read until ``depth`` more chunks were taken from ``chunks``. A chunk whose turn
    comes before the pool took it up is encoded here instead, so that a pool kept busy (hashing that is stuck)
    slows an answer down to one thread but never stalls it. The pool's threads live as long as the server:
    threads made per call would each leave a malloc arena of messages behind."""
    pending: deque[tuple[Future[bytes], tuple[int, int, object]]] = deque()

    def oldest() -> bytes:
        future, chunk = pending.popleft()
        return encode_chunk(*chunk) if future.cancel() else future.result()

    try:
        for chunk in chunks:
            pending.append((pool.submit(encode_chunk, *chunk), chunk))
            if len(pending) > depth:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        for future, _ in pending:  # the ring's buffers are reused once the generator is gone: no encode may still run
            if not future.cancel():
                future.exception()


def _keeping(messages: Iterator[bytes], kept: list[bytes] | None) -> Iterator[bytes]:
    """``messages``, each also appended to ``kept`` (for the cache) unless it is None."""
    for message in messages:
        if kept is not None:
            kept.append(message)
        yield message


class _Timed:
    """Wraps an iterator and adds up the seconds spent producing its items (device-to-host copies)."""

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self.seconds = 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.seconds += time.perf_counter() - started
