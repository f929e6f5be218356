"""Request limits: what one Prepare call may announce, and how many calls may run at once.

Every limit is checked before the server allocates anything for the call, and
a call over one fails at once with a status that names the limit (as the
``nvfp4-prep-field`` trailer and as ``--flag=value`` in the message) and the
value that broke it: sizes get RESOURCE_EXHAUSTED, shapes INVALID_ARGUMENT.
The concurrency limits are the only ones a client should retry: the SDK
recognises them by their field and retries with backoff.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nvfp4_prep.wire import MAX_CONCURRENT_FIELD, MAX_CONCURRENT_PER_CLIENT_FIELD, TensorSpec

from .errors import LimitExceeded, RequestTooComplex


@dataclass(frozen=True)
class RequestLimits:
    """The limits of --max-request-bytes ... --max-concurrent-per-client; 0 turns a byte or per-client limit off
    (the memory budget still bounds every request)."""

    max_request_bytes: int
    max_tensors: int
    max_tensor_rank: int
    max_tensor_bytes: int
    max_concurrent: int
    max_concurrent_per_client: int

    def check_tensors(self, specs: Sequence[TensorSpec], field: str = "header.tensors.tensors") -> None:
        """Raises LimitExceeded or RequestTooComplex when the announced tensors break a limit."""
        if len(specs) > self.max_tensors:
            raise RequestTooComplex(
                f"{field}: announces {len(specs)} tensors, more than this server accepts "
                f"(--max-tensors={self.max_tensors})", "max_tensors")
        total = 0
        for index, spec in enumerate(specs):
            where = f"{field}[{index}] ({spec.name})"
            if len(spec.shape) > self.max_tensor_rank:
                raise RequestTooComplex(
                    f"{where}.shape: has rank {len(spec.shape)}, more than this server accepts "
                    f"(--max-tensor-rank={self.max_tensor_rank})", "max_tensor_rank")
            if self.max_tensor_bytes and spec.byte_length > self.max_tensor_bytes:
                raise LimitExceeded(
                    f"{where}.byte_length: is {spec.byte_length} bytes, more than this server "
                    f"accepts (--max-tensor-bytes={self.max_tensor_bytes})", "max_tensor_bytes")
            total += spec.byte_length
        if self.max_request_bytes and total > self.max_request_bytes:
            raise LimitExceeded(
                f"{field}: announces {total} bytes in all, more than this server accepts "
                f"(--max-request-bytes={self.max_request_bytes})", "max_request_bytes")


class ConcurrencyGate:
    """Prepare calls running now, in total and per client; ``in_flight`` and ``by_client`` are for metrics."""

    def __init__(self, total: int, per_client: int = 0) -> None:
        if total < 1 or per_client < 0:
            raise ValueError("ConcurrencyGate needs total >= 1 and per_client >= 0")
        self.total = total
        self.per_client = per_client
        self.in_flight = 0
        self.by_client: Counter[str] = Counter()
        self._lock = threading.Lock()

    def enter(self, client: str) -> LimitExceeded | None:
        """Counts a call of ``client`` in; or, over a limit, the refusal to send it (nothing counted)."""
        with self._lock:
            if self.in_flight >= self.total:
                return LimitExceeded(
                    f"{self.in_flight} Prepare calls are running, the most this server runs at "
                    f"once (--max-concurrent={self.total}); retry later", MAX_CONCURRENT_FIELD)
            if self.per_client and self.by_client[client] >= self.per_client:
                return LimitExceeded(
                    f"{self.by_client[client]} Prepare calls of this client ({client}) are running, "
                    f"the most one client may run at once (--max-concurrent-per-client="
                    f"{self.per_client}); retry later", MAX_CONCURRENT_PER_CLIENT_FIELD)
            self.in_flight += 1
            self.by_client[client] += 1
            return None

    def leave(self, client: str) -> None:
        with self._lock:
            self.in_flight -= 1
            self.by_client[client] -= 1
            if self.by_client[client] <= 0:
                del self.by_client[client]
