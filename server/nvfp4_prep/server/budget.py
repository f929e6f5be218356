"""Admission control: each request reserves its bytes before any tensor lands.

Requests queue in arrival order until their reservation fits, so a burst
waits instead of running the device out of memory; one that could never fit
is refused at once (LimitExceeded). Waiting ends early when the
client goes away, its deadline passes, or the server starts draining.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import CallCancelled, DeadlinePassed, LimitExceeded, ServerDraining

_POLL_SECONDS = 0.05


class Reservation:
    """Bytes held against a budget; release (or leave the ``with`` block) to give them back."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Gives back ``nbytes`` of this reservation early (e.g. inputs freed after compute)."""
        nbytes = min(nbytes, self.nbytes)
        self.nbytes -= nbytes
        self._budget._give_back(nbytes)

    def release(self) -> None:
        self.shrink(self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class MemoryBudget:
    """A byte budget shared by the requests of one device.

    ``capacity``, ``in_use`` and ``waiting`` are plain attributes for metrics.
    """

    def __init__(self, capacity: int, name: str = "") -> None:
        self.capacity = capacity
        self.name = name
        self.in_use = 0
        self.waiting = 0
        self._closed = False
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, deadline: float | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> Reservation:
        """Waits until ``nbytes`` fit; ``deadline`` is a ``time.monotonic()`` instant."""
        if nbytes > self.capacity:
            raise LimitExceeded(
                f"request needs {nbytes} bytes on {self.name or 'the device'}, more than its memory budget "
                f"of {self.capacity} bytes (--memory-budget)", "memory_budget")
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            self.waiting += 1
            try:
                while self._queue[0] != ticket or self.in_use + nbytes > self.capacity:
                    self._check_wait(deadline, cancelled)
                    timeout = _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - time.monotonic())
                    self._cond.wait(max(timeout, 0.0))
                self.in_use += nbytes
            finally:
                self._queue.remove(ticket)
                self.waiting -= 1
                self._cond.notify_all()
        return Reservation(self, nbytes)

    def _check_wait(self, deadline: float | None, cancelled: Callable[[], bool]) -> None:
        if self._closed:
            raise ServerDraining("server is draining; retry on another replica")
        if cancelled():
            raise CallCancelled("client cancelled while waiting for memory")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlinePassed(
                f"deadline passed while waiting for {self.name or 'device'} memory")

    def close(self) -> None:
        """Refuses every waiting and future reservation (the server is draining)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _give_back(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= nbytes
            self._cond.notify_all()
