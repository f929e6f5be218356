"""Waiting for a test server's state: polling with a bound, and what 'idle' means."""

from __future__ import annotations

import time
from collections.abc import Callable


def settled(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls ``condition`` until it holds (True), or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout`` seconds."""
    if not settled(condition, timeout):
        raise AssertionError("condition not reached in time")


def idle(server) -> bool:
    """No budget held or awaited, no tensor alive, no call running: what every call must leave behind."""
    worker = server.workers[0]
    return (worker.budget.in_use == 0 and worker.budget.waiting == 0 and worker.live.value == 0
            and server.service.in_flight == 0 and server.service.gate.in_flight == 0)
