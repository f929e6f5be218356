"""The server's ceiling on how long one call may run (--max-deadline), whatever deadline the client set.

A call's effective deadline is the sooner of the client's and the ceiling. The
Prepare call checks it between stages and on every message in and out, and
fails with DEADLINE_EXCEEDED naming --max-deadline. A client that stops
sending or reading altogether leaves the call blocked inside gRPC, where no
check runs: a watchdog thread cancels such calls once the ceiling has passed,
so that they give their memory and their concurrency slot back.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from .errors import DeadlinePassed

log = logging.getLogger(__name__)

T = TypeVar("T")

# grpc reports "no deadline" as a remaining time of about 10^10 seconds.
_NO_DEADLINE_SECONDS = 10**8
# Seconds the watchdog waits past the ceiling, so that the per-message check (with its clearer
# status) gets the first chance.
_WATCHDOG_SLACK = 1.0


class _Watchdog:
    """Calls ``cancel`` of every watched call still registered when its instant passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, instant: float, cancel: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            self._pending[key] = (instant, cancel)
            heapq.heappush(self._heap, (instant, key))
            if len(self._heap) > 2 * len(self._pending) + 64:  # drop the entries of calls that ended
                self._heap = [(when, k) for k, (when, _) in self._pending.items()]
                heapq.heapify(self._heap)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="nvfp4-prep-ceiling", daemon=True)
                self._thread.start()
            self._cond.notify()
            return key

    def forget(self, key: int) -> None:
        with self._cond:
            self._pending.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop.is_set() and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stop.is_set():
                    return
                _, key = heapq.heappop(self._heap)
                entry = self._pending.pop(key, None)
            if entry is not None:
                entry[1]()

    def stop(self) -> None:
        """Ends the thread (the server stopped); calls still watched are left to gRPC's own shutdown."""
        with self._cond:
            self._stop.set()
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()


class CallClock:
    """The effective deadline of one call (``time.monotonic()`` instant) and its checks."""

    def __init__(self, ceiling: Ceiling, deadline: float, limited: bool, watch: int | None) -> None:
        self._ceiling = ceiling
        self.deadline = deadline
        self._limited = limited  # whether the ceiling (not the client's deadline) sets it
        self._watch = watch

    def check(self, stage: str) -> None:
        """Raises DeadlinePassed once the deadline has passed; ``stage`` says where, e.g. "before compute"."""
        if time.monotonic() < self.deadline:
            return
        if self._limited:
            raise DeadlinePassed(
                f"the call ran longer than this server allows, stopped {stage} "
                f"(--max-deadline={self._ceiling.seconds:g}s)", "max_deadline")
        raise DeadlinePassed(f"deadline passed {stage}")

    def messages(self, items: Iterator[T], stage: str) -> Iterator[T]:
        """``items``, checking the deadline before each one is handed on; closes ``items`` when closed."""
        try:
            for item in items:
                self.check(stage)
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """Ends the watch of a call that ended."""
        if self._watch is not None:
            self._ceiling.watchdog.forget(self._watch)


class Ceiling:
    """--max-deadline for every call of one server."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError("the deadline ceiling must be > 0 seconds")
        self.seconds = seconds
        self.watchdog = _Watchdog()

    def start(self, context: grpc.ServicerContext) -> CallClock:
        """The clock of a call that starts now; ``close()`` it when the call ends."""
        now = time.monotonic()
        remaining = context.time_remaining()
        client = None if remaining is None or remaining > _NO_DEADLINE_SECONDS else now + remaining
        ceiling = now + self.seconds
        limited = client is None or ceiling < client
        if not limited:
            return CallClock(self, client, False, None)  # gRPC itself ends the call at the client's deadline

        def cancel() -> None:
            if context.is_active():
                log.warning("cancelled a call still running %.0fs after it started (--max-deadline=%gs): its "
                            "client stopped sending or reading", self.seconds + _WATCHDOG_SLACK, self.seconds)
                context.cancel()

        return CallClock(self, ceiling, True, self.watchdog.watch(ceiling + _WATCHDOG_SLACK, cancel))

    def stop(self) -> None:
        """Stops the watchdog's thread; for a server that stops."""
        self.watchdog.stop()
