"""When the SDK sends a failed call again, and for how long.

A server restart (a rollout, an OOM kill, a node drain) takes tens of seconds;
an SDK that gave up after a few seconds made ``prepare --server`` fail on every
restart. So a call that failed for a passing reason (``errors.retryable``) is
sent again with exponential backoff and jitter for up to ``retry_timeout``
seconds after it first failed, counted again whenever an attempt got further
than the one before (a resumed download). It stops earlier when the caller's
per-call deadline would pass, after ``retries`` retries if that is set, and
after ``HANDSHAKE_ATTEMPTS`` attempts in a row that TLS failed at connection
setup (a certificate does not become valid by waiting).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import PrepClientError, PrepDeadlineExceeded, PrepHandshakeFailed, from_rpc_error, retryable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts in a row that failed at connection setup (TLS handshake, a client certificate refused) before giving
# up: two, so that one such failure racing a server restart does not end the call, and no more.
HANDSHAKE_ATTEMPTS = 2


@dataclass(frozen=True)
class RetryPolicy:
    """``retry_timeout``: seconds to keep retrying after a call first failed (0: no retries);
    ``retries``: at most this many retries (None: as many as ``retry_timeout`` allows);
    ``backoff``/``max_backoff``: the first and the largest pause, in seconds, before jitter."""

    retry_timeout: float = 60.0
    retries: int | None = None
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        for name in ("retry_timeout", "backoff", "max_backoff"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number of seconds >= 0, got {value!r}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries: expected None or an integer >= 0, got {self.retries!r}")

    def pause(self, failures: int) -> float:
        """The pause after the ``failures``-th failure in a row: doubling up to ``max_backoff``, times a
        random factor in [0.5, 1] so that clients cut off together do not come back together."""
        return min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)

    def run(self, attempt: Callable[[float | None], T], timeout: float | None, what: str, *, tls: bool,
            position: Callable[[], object] = lambda: None) -> T:
        """``attempt(seconds left or None)`` until it succeeds, or fails in a way that retrying will not mend.

        ``timeout`` bounds everything, retries included; ``what`` names the call in the log; ``tls`` says
        whether the channel is TLS (for the hint of a failed handshake); ``position`` tells how far the
        call has got (a changed value after a failure restarts the retry window).
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        failures = streak = setup_failures = 0  # streak: failures since the call last got further
        window_end = 0.0
        reached = position()
        while True:
            try:
                return attempt(None if deadline is None else deadline - time.monotonic())
            except grpc.RpcError as err:
                error = from_rpc_error(err, tls=tls)
            except PrepClientError as err:  # raised by the SDK's own checks of the answer
                error = err
            if not retryable(error):
                raise error
            now = time.monotonic()
            failures += 1
            setup_failures = setup_failures + 1 if isinstance(error, PrepHandshakeFailed) else 0
            if failures == 1 or position() != reached:
                window_end, reached, streak = now + self.retry_timeout, position(), 0
            streak += 1
            if now >= window_end or setup_failures >= HANDSHAKE_ATTEMPTS or \
                    (self.retries is not None and failures > self.retries):
                raise _gave_up(error, failures, now - started)
            pause = min(self.pause(streak), window_end - now)
            if deadline is not None and now + pause >= deadline:
                raise PrepDeadlineExceeded(
                    f"the call's deadline of {timeout:g} s would pass before it could be sent again; last "
                    f"error: {error}",
                    grpc.StatusCode.DEADLINE_EXCEEDED, error.field) from error
            log.info("%s: attempt %d failed (%s); retrying in %.1f s, for up to %.0f s more", what, failures,
                     error, pause, window_end - now)
            time.sleep(pause)


def _gave_up(error: PrepClientError, attempts: int, elapsed: float) -> PrepClientError:
    """``error``, saying how long it was retried when it was."""
    if attempts == 1:
        return error
    return type(error)(f"{error.details} (gave up after {attempts} attempts in {elapsed:.1f} s)", error.code,
                       error.field)
