"""How long one call may take: the server's ceiling (--max-deadline), the header's own (--header-timeout), and
blocking work that must not outlive the call.

A call's effective deadline is the sooner of the client's and the ceiling. The
Prepare call checks it between stages and on every message in and out, and
fails with DEADLINE_EXCEEDED naming --max-deadline. Where no check can run,
because the handler thread waits inside gRPC (a client that sends no header, or
stops sending or reading) or inside a server stage that cannot be interrupted,
a watchdog thread ends the call once its time has passed, so that it gives its
memory and its concurrency slot back; the status it sends says which side
stopped, from what the call was doing (``CallClock.doing``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from .errors import DeadlinePassed
from .status import end_from_another_thread, status_of

log = logging.getLogger(__name__)

T = TypeVar("T")

# grpc reports "no deadline" as a remaining time of about 10^10 seconds.
_NO_DEADLINE_SECONDS = 10**8
# Seconds the watchdog waits past the ceiling, so that the per-message check (with its clearer
# status) gets the first chance.
_WATCHDOG_SLACK = 1.0
_END = object()
# What a call is doing when no stage says more.
_WORKING = ("working on the call", False)


class _Watchdog:
    """Calls ``fire`` of every watched call still registered when its instant passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, instant: float, fire: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            self._pending[key] = (instant, fire)
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
                try:
                    entry[1]()
                except Exception:  # one call's failure to end must not stop the watchdog for every other call
                    log.exception("the watchdog could not end a call")

    def stop(self) -> None:
        """Ends the thread (the server stopped); calls still watched are left to gRPC's own shutdown."""
        with self._cond:
            self._stop.set()
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()


class CallClock:
    """The effective deadline of one call (``time.monotonic()`` instant), its checks, and what it is doing.

    ``expired`` is the error the watchdog ended the call with, if it did: the handler reports that rather than
    whatever the end of its stream then caused.
    """

    def __init__(self, ceiling: Ceiling, context: grpc.ServicerContext, deadline: float, limited: bool) -> None:
        self._ceiling = ceiling
        self._context = context
        self.deadline = deadline
        self._limited = limited  # whether the ceiling (not the client's deadline) sets it
        self._watches: list[int] = []
        self._header_watch: int | None = None
        self._doing: list[tuple[str, bool]] = []  # (activity, whether it waits on the client); innermost last
        self._on_end: list[Callable[[], None]] = []
        self.expired: DeadlinePassed | None = None

    def check(self, stage: str) -> None:
        """Raises DeadlinePassed once the deadline has passed; ``stage`` says where, e.g. "before compute"."""
        if time.monotonic() < self.deadline:
            return
        if self._limited:
            raise DeadlinePassed(
                f"the call ran longer than this server allows, stopped {stage} "
                f"(--max-deadline={self._ceiling.seconds:g}s)", "max_deadline")
        raise DeadlinePassed(f"deadline passed {stage}")

    @contextlib.contextmanager
    def doing(self, activity: str, client: bool = False) -> Iterator[None]:
        """Marks what the call does meanwhile (``client``: waits on its client), for the watchdog's status; the
        latest mark of any thread (a call answered while it arrives receives on a thread of its own) counts."""
        entry = (activity, client)
        self._doing.append(entry)
        try:
            yield
        finally:
            self._doing.remove(entry)  # this thread's, whatever other threads marked since

    def received(self, items: Iterator[T]) -> Iterator[T]:
        """The request stream ``items``, checking the deadline on each message and --idle-timeout between
        them; closes ``items`` when closed."""
        try:
            while True:
                with self.doing("waiting for its client to send", client=True), self._idle("send"):
                    item = next(items, _END)
                if item is _END:
                    return
                self.check("while receiving")
                yield item
        finally:
            _close(items)

    def sent(self, items: Iterator[T]) -> Iterator[T]:
        """The response stream ``items``, checking the deadline before each message goes out and
        --idle-timeout while the client has not taken it."""
        try:
            while True:
                item = next(items, _END)
                if item is _END:
                    return
                self.check("while sending")
                with self.doing("waiting for its client to read", client=True), self._idle("read"):
                    yield item
        finally:
            _close(items)

    @contextlib.contextmanager
    def _idle(self, what: str) -> Iterator[None]:
        """Ends the call if the client does not ``what`` (send, read) within --idle-timeout."""
        seconds = self._ceiling.idle_seconds
        instant = time.monotonic() + seconds
        if instant >= self.deadline:  # the deadline comes first anyway
            yield
            return
        key = self._ceiling.watchdog.watch(instant, lambda: self._end(DeadlinePassed(
            f"the client did not {what} its next message within {seconds:g}s (--idle-timeout={seconds:g}s)",
            "idle_timeout")))
        try:
            yield
        finally:
            self._ceiling.watchdog.forget(key)

    def on_end(self, callback: Callable[[], None]) -> None:
        """Has ``callback`` run (on the watchdog's thread) if the watchdog ends the call, e.g. to give its
        concurrency slot back while its handler thread is still blocked."""
        self._on_end.append(callback)

    def header_arrived(self) -> None:
        """The request header came: --header-timeout no longer applies."""
        if self._header_watch is not None:
            self._ceiling.watchdog.forget(self._header_watch)
            self._header_watch = None

    def close(self) -> None:
        """Ends the watches of a call that ended."""
        self.header_arrived()
        for key in self._watches:
            self._ceiling.watchdog.forget(key)
        self._watches.clear()

    def _watch(self, instant: float, fire: Callable[[], None]) -> int:
        key = self._ceiling.watchdog.watch(instant, fire)
        self._watches.append(key)
        return key

    def _no_header(self) -> None:
        """Watchdog: no header within --header-timeout."""
        seconds = self._ceiling.header_seconds
        self._end(DeadlinePassed(f"request.header: did not arrive within {seconds:g}s of the call's start "
                                 f"(--header-timeout={seconds:g}s)", "request.header"))

    def _overran(self) -> None:
        """Watchdog: the call still runs past --max-deadline, where no check of its own could stop it."""
        innermost = self._doing[-1:]  # a copy: the handler's thread may change the list meanwhile
        activity, client = innermost[0] if innermost else _WORKING
        seconds = self._ceiling.seconds
        if client:
            log.warning("ended a call still running %.0fs after it started (--max-deadline=%gs): it was %s, and "
                        "its client stopped", seconds + _WATCHDOG_SLACK, seconds, activity)
            blame = f"the call was {activity}, and the client stopped"
        else:
            log.error("ended a call still running %.0fs after it started (--max-deadline=%gs): the server itself "
                      "was still %s (a server-side stage overran; not the client's doing)",
                      seconds + _WATCHDOG_SLACK, seconds, activity)
            blame = f"the server itself was still {activity} (a server-side stage overran, not the client)"
        self._end(DeadlinePassed(f"the call ran longer than this server allows (--max-deadline={seconds:g}s): "
                                 f"{blame}", "max_deadline"))

    def _end(self, error: DeadlinePassed) -> None:
        if self._context.is_active():
            self.expired = error
            end_from_another_thread(self._context, status_of(error))
            for callback in self._on_end:
                callback()


def _close(items: Iterator) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()


class Ceiling:
    """--max-deadline, --header-timeout and --idle-timeout for every call of one server."""

    def __init__(self, seconds: float, header_seconds: float | None = None, idle_seconds: float | None = None) -> None:
        if not seconds > 0 or any(s is not None and not s > 0 for s in (header_seconds, idle_seconds)):
            raise ValueError("the deadline ceiling, the header timeout and the idle timeout must be > 0 seconds")
        self.seconds = seconds
        self.header_seconds = seconds if header_seconds is None else header_seconds
        self.idle_seconds = seconds if idle_seconds is None else idle_seconds
        self.watchdog = _Watchdog()

    def start(self, context: grpc.ServicerContext) -> CallClock:
        """The clock of a call that starts now; ``close()`` it when the call ends."""
        now = time.monotonic()
        remaining = context.time_remaining()
        client = None if remaining is None or remaining > _NO_DEADLINE_SECONDS else now + remaining
        ceiling = now + self.seconds
        limited = client is None or ceiling < client
        clock = CallClock(self, context, ceiling if limited else client, limited)
        if limited:  # else gRPC itself ends the call at the client's deadline
            clock._watch(ceiling + _WATCHDOG_SLACK, clock._overran)
        if now + self.header_seconds < clock.deadline:
            clock._header_watch = clock._watch(now + self.header_seconds, clock._no_header)
        return clock

    def stop(self) -> None:
        """Stops the watchdog's thread; for a server that stops."""
        self.watchdog.stop()
