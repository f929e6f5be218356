"""Waiting for a test server's state: polling with a bound, and what 'idle' means."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def idle(server) -> bool:
    """No budget held or awaited, no tensor alive, no call running: what every call must leave behind."""
    worker = server.workers[0]
    return (worker.budget.in_use == 0 and worker.budget.waiting == 0 and worker.live.value == 0
            and server.service.in_flight == 0 and server.service.gate.in_flight == 0)
