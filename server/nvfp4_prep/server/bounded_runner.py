"""Blocking work that must not outlive the call waiting for it.

Reads that may never return (a hung network mount) run on the daemon threads of a ``BoundedRunner``: the
call waits for them only while its checks (deadline, cancellation) pass, then leaves them, with what they
hold, to finish on their own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import CallCancelled, CallError, ServerDraining

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a call waiting for a BoundedRunner job runs its checks.
_POLL_SECONDS = 0.05


class _Job(Generic[T]):
    """One piece of work on a runner thread, and what becomes of it once its caller stopped waiting."""

    def __init__(self, work: Callable[[Callable[[], None]], T], discard: Callable[[T], object] | None) -> None:
        self.work = work
        self.discard = discard
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.leftovers: contextlib.ExitStack | None = None
        self.lock = threading.Lock()

    def interrupt(self) -> None:
        """For the work to call between pieces: raises once nobody waits for it any more."""
        if self.abandoned:
            raise CallCancelled("the call stopped waiting for this read")

    def execute(self) -> None:
        if not self.abandoned:
            try:
                self.result = self.work(self.interrupt)
            except BaseException as err:  # handed to the waiting call, which raises it
                self.error = err
        with self.lock:
            self.done.set()
            abandoned = self.abandoned
        if abandoned:
            self._let_go()

    def _let_go(self) -> None:
        """Frees what a call that stopped waiting left to this job: its result, then its leftovers."""
        try:
            if self.result is not None and self.discard is not None:
                self.discard(self.result)
            if self.leftovers is not None:
                self.leftovers.close()
        except Exception:
            log.exception("freeing what an abandoned read held failed")
        self.result = self.error = None


class BoundedRunner:
    """Runs blocking work (checkpoint reads) on a few daemon threads; a call waits for it only while its checks
    pass, so a read that never returns (a hung mount) costs a thread, not the call's slot, nor shutdown.

    Threads start on demand up to ``max_threads`` and are reused; a thread whose job was abandoned comes back
    once the job returns. ``stuck`` counts the abandoned jobs still running (for metrics and tests).
    """

    def __init__(self, name: str, max_threads: int) -> None:
        if max_threads < 1:
            raise ValueError("a BoundedRunner needs max_threads >= 1")
        self.name = name
        self.max_threads = max_threads
        self.threads = 0
        self.stuck = 0
        self._idle = 0
        self._closed = False
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()

    def run(self, work: Callable[[Callable[[], None]], T], check: Callable[[], None],
            leftovers: contextlib.ExitStack | None = None, discard: Callable[[T], object] | None = None) -> T:
        """``work(interrupt)``'s result, or the error of ``check`` (called every few ms while it runs).

        When ``check`` raises first, the job is abandoned: ``interrupt`` raises from then on, ``discard``
        receives its result when it returns anyway, and what ``leftovers`` holds (e.g. the reservation and the
        files the work uses) moves to the job, which lets go of it then; the caller's stack is left empty.
        """
        job: _Job[T] = _Job(work, discard)
        self._submit(job)
        while not job.done.wait(_POLL_SECONDS):
            try:
                check()
            except Exception as err:
                started = self._abandon(job, leftovers)
                if started is None:
                    continue  # it finished meanwhile: its result stands
                if isinstance(err, CallError) and not started and self.stuck:
                    raise type(err)(f"{err.message} (the read had not started: all {self.max_threads} reader "
                                    f"threads of this server were busy, {self.stuck} of them with reads that "
                                    "have not returned)", err.field) from None
                raise
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        result, job.result = job.result, None
        return result  # type: ignore[return-value]

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise ServerDraining("server is stopping; retry on another replica")
            self._jobs.append(job)
            if self._idle < len(self._jobs) and self.threads < self.max_threads:
                self.threads += 1
                threading.Thread(target=self._serve, name=f"{self.name}-{self.threads}", daemon=True).start()
            self._cond.notify()

    def _abandon(self, job: _Job, leftovers: contextlib.ExitStack | None) -> bool | None:
        """Gives up on ``job``: whether it had started, or None when it finished meanwhile (the caller then takes
        its result as usual)."""
        with job.lock:
            if job.done.is_set():
                return None
            job.abandoned = True
            job.leftovers = leftovers.pop_all() if leftovers is not None else None
        with self._cond:
            started = job not in self._jobs
            if started:
                self.stuck += 1
            else:
                self._jobs.remove(job)
        if not started:  # no thread will ever run it: let go of its leftovers now
            job.done.set()
            job._let_go()
        return started

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._jobs and not self._closed:
                    self._cond.wait()
                self._idle -= 1
                if not self._jobs:
                    self.threads -= 1
                    return
                job = self._jobs.popleft()
            job.execute()
            if job.abandoned:
                with self._cond:
                    self.stuck -= 1
            del job  # its work's closure may hold what the read filled (a layer on the device): not while idle

    def close(self) -> None:
        """Ends idle threads and refuses new work; threads held by reads that never return stay (daemons)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
