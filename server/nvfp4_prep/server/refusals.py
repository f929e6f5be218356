"""Refused unauthenticated calls, counted by a bounded set of reasons and logged without flooding.

A client without a valid token can be refused thousands of times a second; a
WARNING per refusal floods the log, and echoing what the caller sent (its
method path, its metadata) writes attacker-chosen text, a token put in the
path included, into it. So only the listener, the reason class and the peer
address the server saw are logged: the first refusal at once, then at most
one line per ``interval`` seconds, which carries the count of refusals since
the previous line. Every refusal is counted for ``nvfp4_prep_auth_refusals_total``.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

# The listeners that check tokens, and why a call was refused: the label values of the refusal metric.
GRPC = "grpc"
METRICS = "metrics"
LISTENERS = (GRPC, METRICS)
NO_TOKEN = "no_token"
UNKNOWN_TOKEN = "unknown_token"
REASONS = (NO_TOKEN, UNKNOWN_TOKEN)
DESCRIPTIONS = {NO_TOKEN: "no bearer token", UNKNOWN_TOKEN: "a bearer token this server does not accept"}
# Seconds between two refusal log lines at most.
LOG_INTERVAL = 60.0


class RefusalLog:
    """Counts refusals by (listener, reason) and logs them at most once every ``interval`` seconds."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._counts = {(listener, reason): 0 for listener in LISTENERS for reason in REASONS}
        self._unlogged: dict[tuple[str, str], int] = {}
        self._last_line: float | None = None

    def refused(self, listener: str, reason: str, peer: str) -> None:
        """Records one refusal; ``peer`` is the address the server saw (never anything the caller sent)."""
        key = (listener, reason)
        if key not in self._counts:
            raise ValueError(f"refusal ({listener!r}, {reason!r}) is not one of listeners {LISTENERS} "
                             f"and reasons {REASONS}")
        now = time.monotonic()
        with self._lock:
            self._counts[key] += 1
            if self._last_line is not None and now - self._last_line < self.interval:
                self._unlogged[key] = self._unlogged.get(key, 0) + 1
                return
            unlogged, self._unlogged, self._last_line = self._unlogged, {}, now
        since = ", ".join(f"{where}/{why} {count}" for (where, why), count in sorted(unlogged.items())) or "none"
        log.warning("refused a call on the %s listener from %s: it carried %s (refused since the last such line: "
                    "%s; at most one line every %gs, all counted in nvfp4_prep_auth_refusals_total)",
                    listener, peer, DESCRIPTIONS[reason], since, self.interval,
                    extra={"listener": listener, "reason": reason, "peer": peer,
                           "unlogged_refusals": sum(unlogged.values())})

    def counts(self) -> dict[tuple[str, str], int]:
        """Refusals so far by (listener, reason), every pair present."""
        with self._lock:
            return dict(self._counts)
