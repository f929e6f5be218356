"""Admission control: each request reserves its bytes before any tensor lands.

Requests wait until their reservation fits, so a burst waits instead of
running the device out of memory; one that could never fit is refused at once
(LimitExceeded). A request that fits now goes ahead of earlier ones that do
not (two large requests must not hold every small one back), but only so
often: once an earlier request has been passed ``max_bypasses`` times or has
waited ``priority_after`` seconds, nothing passes it any more until it fits,
so large requests are not starved. Waiting ends early when the client goes
away, its deadline passes, or the server starts draining.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .errors import CallCancelled, DeadlinePassed, LimitExceeded, ServerDraining

_POLL_SECONDS = 0.05
# How often, and for how long, a waiting request may be passed by later ones that fit (see the module text).
MAX_BYPASSES = 16
PRIORITY_AFTER_SECONDS = 30.0


class _Waiter:
    """A request waiting for its bytes: how many, since when, and how often later requests went first."""

    __slots__ = ("bypassed", "nbytes", "since")

    def __init__(self, nbytes: int, since: float) -> None:
        self.nbytes = nbytes
        self.since = since
        self.bypassed = 0


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

    def __init__(self, capacity: int, name: str = "", max_bypasses: int = MAX_BYPASSES,
                 priority_after: float = PRIORITY_AFTER_SECONDS) -> None:
        self.capacity = capacity
        self.name = name
        self.max_bypasses = max_bypasses
        self.priority_after = priority_after
        self.in_use = 0
        self.waiting = 0
        self._closed = False
        self._queue: list[_Waiter] = []  # in arrival order
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, deadline: float | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> Reservation:
        """Waits until ``nbytes`` fit; ``deadline`` is a ``time.monotonic()`` instant."""
        if nbytes > self.capacity:
            raise LimitExceeded(
                f"request needs {nbytes} bytes on {self.name or 'the device'}, more than its memory budget "
                f"of {self.capacity} bytes (--memory-budget)", "memory_budget")
        with self._cond:
            me = _Waiter(nbytes, time.monotonic())
            self._queue.append(me)
            self.waiting += 1
            try:
                while not self._may_go(me):
                    self._check_wait(deadline, cancelled)
                    timeout = _POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - time.monotonic())
                    self._cond.wait(max(timeout, 0.0))
                self.in_use += nbytes
            finally:
                self._queue.remove(me)
                self.waiting -= 1
                self._cond.notify_all()
        return Reservation(self, nbytes)

    def _may_go(self, me: _Waiter) -> bool:
        """Whether ``me`` fits now and no earlier waiter has priority; counts the waiters it passes."""
        if self.in_use + me.nbytes > self.capacity:
            return False
        now = time.monotonic()
        passed = []
        for earlier in self._queue:
            if earlier is me:
                break
            if self.in_use + me.nbytes + earlier.nbytes <= self.capacity:
                continue  # both fit: going first takes nothing from it
            if earlier.bypassed >= self.max_bypasses or now - earlier.since >= self.priority_after:
                return False
            passed.append(earlier)
        for earlier in passed:
            earlier.bypassed += 1
        return True

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
