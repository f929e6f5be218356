"""The deadline-bounded runner at its seam: real blocking system calls (a read of a pipe nobody writes) on its
daemon threads, a caller that stops waiting at its deadline, and what the abandoned read held."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

from nvfp4_prep.server.bounded_runner import BoundedRunner
from nvfp4_prep.server.errors import CallCancelled, DeadlinePassed, ServerDraining
from tests.helpers.server_state import wait_for


def deadline_check(seconds: float, what: str):
    """A call's check: DeadlinePassed naming ``what`` once ``seconds`` have passed."""
    deadline = time.monotonic() + seconds

    def check() -> None:
        if time.monotonic() >= deadline:
            raise DeadlinePassed(f"deadline passed while {what}")
    return check


@pytest.fixture
def pipe():
    """A pipe whose write end nobody writes: reading it blocks in the kernel until the end is closed."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_read_that_never_returns_is_given_up_at_the_deadline(pipe):
    read_end, write_end = pipe
    runner = BoundedRunner("test-read", 2)
    released = []
    started = time.monotonic()
    with contextlib.ExitStack() as owned:
        owned.callback(released.append, "reservation")
        with pytest.raises(DeadlinePassed, match="while reading the pipe"):
            runner.run(lambda _interrupt: os.read(read_end, 1), deadline_check(0.3, "reading the pipe"), owned)
        assert released == []  # handed to the read, which still runs
    assert time.monotonic() - started < 10
    assert runner.stuck == 1 and released == []
    os.write(write_end, b"x")  # the read returns at last: what it held is let go of then, its result dropped
    wait_for(lambda: runner.stuck == 0)
    assert released == ["reservation"]
    runner.close()
    wait_for(lambda: runner.threads == 0)


def test_work_that_finishes_in_time_returns_its_result_and_errors():
    runner = BoundedRunner("test-read", 1)
    never = deadline_check(60, "reading")
    assert runner.run(lambda _interrupt: 41 + 1, never) == 42
    with pytest.raises(ZeroDivisionError):
        runner.run(lambda _interrupt: 1 // 0, never)
    assert runner.threads == 1  # the same thread served both
    runner.close()
    wait_for(lambda: runner.threads == 0)


def test_an_abandoned_result_is_discarded_and_the_work_sees_its_interrupt(pipe):
    read_end, write_end = pipe
    runner = BoundedRunner("test-read", 2)
    discarded, interrupted = [], threading.Event()

    def work(interrupt):
        data = os.read(read_end, 1)
        try:
            interrupt()
        except CallCancelled:
            interrupted.set()
        return data

    with pytest.raises(DeadlinePassed):
        runner.run(work, deadline_check(0.2, "reading"), discard=discarded.append)
    os.write(write_end, b"y")
    assert interrupted.wait(10)
    wait_for(lambda: discarded == [b"y"])
    runner.close()


def test_reads_stuck_on_every_thread_make_later_calls_fail_at_their_deadline_saying_so(pipe):
    read_end, write_end = pipe
    runner = BoundedRunner("test-read", 2)
    for _ in range(2):
        with pytest.raises(DeadlinePassed):
            runner.run(lambda _interrupt: os.read(read_end, 1), deadline_check(0.2, "reading"))
    assert runner.stuck == 2
    released = []
    with contextlib.ExitStack() as owned:
        owned.callback(released.append, "reservation")
        with pytest.raises(DeadlinePassed, match="all 2 reader threads of this server were busy, 2 of them"):
            runner.run(lambda _interrupt: 1, deadline_check(0.2, "reading"), owned)
    assert released == ["reservation"]  # it never started: nothing waits to let go of it
    os.write(write_end, b"ab")
    wait_for(lambda: runner.stuck == 0)
    assert runner.run(lambda _interrupt: "fine", deadline_check(60, "reading")) == "fine"
    runner.close()
    with pytest.raises(ServerDraining):
        runner.run(lambda _interrupt: 1, deadline_check(60, "reading"))
