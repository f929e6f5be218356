"""Running a producer a few items ahead of its consumer, on a helper thread.

In gRPC's synchronous API a stream's thread waits for each message to be
written before it asks for the next one. Producing the next chunk (copying it
off the device, checksumming, encoding) on a helper thread lets that work
overlap the write.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.05
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch(Generic[T]):
    """Iterates ``items`` on a helper thread, at most ``depth`` items ahead of the consumer.

    An exception in the producer is raised to the consumer. ``close()`` may be
    called from any thread (e.g. while gRPC's thread waits in ``next``): the
    consumer then sees the end and the producer stops and closes ``items``.
    """

    def __init__(self, items: Iterator[T], depth: int = 4) -> None:
        self._items = items
        self._ready: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="nvfp4-prep-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer
            self._put(_Failure(err))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
            if self._stop.is_set():  # nobody takes what is left: a failure there would hold its frames
                self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        while not self._stop.is_set():
            try:
                item = self._ready.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if item is _DONE:
                self._stop.set()
                break
            if isinstance(item, _Failure):
                self._stop.set()
                error, item = item.error, None
                try:
                    raise error
                finally:  # the traceback holds this frame: without this, frame and error would hold each other
                    error = None
            return item
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._drain()  # (the producer drains too, after its last put)
