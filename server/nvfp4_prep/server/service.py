"""The Prep servicer: the gRPC edge of every call (its header, admission of the call itself, draining, its final
status).

A stream holds no concurrency slot until its header arrives (within --header-timeout), so streams that
never send one cannot lock correct clients out.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import (
    MAX_CONCURRENT_FIELD,
    MAX_CONCURRENT_PER_CLIENT_FIELD,
    REQUEST_ID_KEY,
    chunk_of,
    encode_message,
)

from .admission import Admission
from .bounded_runner import BoundedRunner
from .bulk.connection import BulkHub
from .cache import PreparedCache
from .client_memory import ClientMemory
from .config import ServeConfig
from .deadline import CallClock, Ceiling
from .decode import decode_request_or_malformed, reject_malformed
from .errors import ServerDraining, invalid
from .limits import ConcurrencyGate, RequestLimits
from .metrics import UNKNOWN_BACKEND, Metrics
from .open_checkpoints import OpenCheckpoints
from .prepare_call import PrepareCall
from .resources import CallResources
from .status import Status, abort, status_of
from .worker import DeviceWorker

log = logging.getLogger(__name__)

HASH_THREADS = 8
# Reader threads per concurrency slot: one for the read each running call may wait for, one more for reads
# that calls gave up on and that have not returned (a hung mount).
READ_THREADS_PER_SLOT = 2
# Calls refused by the concurrency limits are counted, not logged one by one.
REFUSAL_FIELDS = (MAX_CONCURRENT_FIELD, MAX_CONCURRENT_PER_CLIENT_FIELD)


class PrepService(prep_pb2_grpc.PrepServicer):
    """Shared state of the Prepare calls: workers, cache, the bulk transport (None: off), draining.

    ``in_flight`` (Prepare handlers running, those still waiting for their header included; ``gate`` counts
    the admitted ones) and ``outcomes`` (finished calls by status name, "OK" for success) are plain
    attributes for metrics.
    """

    def __init__(self, workers: Sequence[DeviceWorker], cache: PreparedCache, chunk_size: int,
                 allowed_roots: Sequence[Path], capabilities: pb.Capabilities, metrics: Metrics,
                 limits: RequestLimits, ceiling: Ceiling, bulk: BulkHub | None = None,
                 ipc_lease_seconds: float = ServeConfig.ipc_lease_timeout) -> None:
        self.workers = list(workers)
        self.bulk = bulk
        self.ipc_lease_seconds = ipc_lease_seconds
        self.client_memory = ClientMemory(ipc_lease_seconds)  # same-node clients' memory that answers are written into
        self.capabilities = capabilities
        self.metrics = metrics
        self.ceiling = ceiling
        self.gate = ConcurrencyGate(limits.max_concurrent, limits.max_concurrent_per_client)
        self.hash_pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="nvfp4-prep-hash")
        self.reads = BoundedRunner("nvfp4-prep-read", READ_THREADS_PER_SLOT * limits.max_concurrent)
        roots = tuple(str(root) for root in allowed_roots)
        self.resources = CallResources(Admission(self.workers, limits), cache, metrics, chunk_size, roots,
                                       self.hash_pool, self.reads, OpenCheckpoints(roots))
        self.in_flight = 0
        self.outcomes: Counter[str] = Counter()
        self.draining = False
        self._idle = threading.Condition()

    def GetCapabilities(self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext) -> pb.Capabilities:
        self.metrics.observe_request("GetCapabilities", UNKNOWN_BACKEND, "OK", 0.0)
        return self.capabilities

    def Prepare(self, request_iterator: Iterator[pb.PrepareRequest],
                context: grpc.ServicerContext) -> Iterator[pb.PrepareResponse]:
        request_id = _request_id(context)
        client = client_identity(context)
        with self._idle:
            draining = self.draining
            if not draining:
                self.in_flight += 1
        if draining:
            self._refuse(context, status_of(ServerDraining("server is draining; retry on another replica")))
        started = time.perf_counter()
        clock = self.ceiling.start(context)
        requests = clock.received(reject_malformed(request_iterator))
        summary: dict[str, object] = {"request_id": request_id}
        failure: Status | None = None
        admitted = finished = False
        try:
            header = _read_header(requests, clock)
            failure = self._admit(client)
            if failure is None:
                admitted = True
                slot = _Slot(self.gate, client, self._idle)
                clock.on_end(slot.release)  # a call the watchdog ends gives its slot back at once
                self.metrics.inflight.labels("Prepare").inc()
                yield from clock.sent(PrepareCall(self.resources, header, requests, context, clock, summary,
                                                       self.bulk, self.ipc_lease_seconds,
                                                       self.client_memory).run())
                finished = True
        except Exception as err:
            failure = status_of(err)
            # The traceback's frames hold the call's tensors, and grpc keeps an RpcError with the call's
            # state: without it, nothing keeps them alive past the call.
            err.__traceback__ = None
        finally:
            if clock.expired is not None:  # the watchdog ended the call; what the stream did then is moot
                failure = status_of(clock.expired)
            outcome = _outcome(context, failure, finished)
            clock.close()
            if admitted:
                slot.release()
            self._exit(outcome)
            seconds = time.perf_counter() - started
            self._count(summary, outcome, seconds)
            if admitted:
                self.metrics.inflight.labels("Prepare").dec()
            if admitted or failure is None or failure.field not in REFUSAL_FIELDS:  # refusals are only counted
                log.info("Prepare %s in %.3fs %s", outcome, seconds, " ".join(f"{k}={v}" for k, v in summary.items()),
                         extra={"outcome": outcome, **summary})
        if failure is not None and context.is_active():
            abort(context, failure)

    def _refuse(self, context: grpc.ServicerContext, refusal: Status) -> None:
        """Ends a call refused before it started (raises)."""
        with self._idle:
            self.outcomes[refusal.code.name] += 1
        self.metrics.observe_request("Prepare", UNKNOWN_BACKEND, refusal.code.name, 0.0)
        abort(context, refusal)

    def _count(self, summary: dict, outcome: str, seconds: float) -> None:
        backend = str(summary.get("backend", UNKNOWN_BACKEND))
        self.metrics.observe_request("Prepare", backend, outcome, seconds)
        if summary.get("bytes_in"):
            source = "checkpoint" if summary.get("source") == "ref" else "stream"
            self.metrics.received_bytes.labels(backend, source).inc(int(summary["bytes_in"]))
        if summary.get("bytes_sent"):
            self.metrics.sent_bytes.labels(backend).inc(int(summary["bytes_sent"]))

    def _admit(self, client: str) -> Status | None:
        """Counts a call whose header arrived into the concurrency limits; or the refusal to end it with."""
        with self._idle:
            if self.draining:
                return status_of(ServerDraining("server is draining; retry on another replica"))
            refusal = self.gate.enter(client)
            return None if refusal is None else status_of(refusal)

    def _exit(self, outcome: str) -> None:
        with self._idle:
            self.in_flight -= 1
            self.outcomes[outcome] += 1
            self._idle.notify_all()

    def begin_drain(self) -> None:
        """Refuses new calls and those still waiting for memory; running ones carry on."""
        with self._idle:
            self.draining = True
        for worker in self.workers:
            worker.budget.close()

    def wait_idle(self, timeout: float) -> bool:
        """Waits until no admitted Prepare call runs; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self.gate.in_flight == 0, timeout)

    def wait_handlers(self, timeout: float) -> bool:
        """Waits until no Prepare handler runs (each gives its gRPC thread back); False if ``timeout`` passed."""
        with self._idle:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)

    def close(self) -> None:
        """Ends the pools' idle threads, busy ones with their work (a stopping server waits for none), and closes
        the mappings of clients' memory and the checkpoints kept open."""
        self.reads.close()
        self.resources.checkpoints.close()
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.client_memory.close()


def add_to_server(service: PrepService, server: grpc.Server) -> None:
    """Registers ``service`` like the generated ``add_PrepServicer_to_server``, except that Prepare's
    chunks go through ``chunk_codec`` instead of protobuf (same bytes on the wire, fewer copies)."""
    name = pb.DESCRIPTOR.services_by_name["Prep"].full_name
    handlers = {
        "Prepare": grpc.stream_stream_rpc_method_handler(
            service.Prepare, request_deserializer=decode_request_or_malformed, response_serializer=encode_message),
        "GetCapabilities": grpc.unary_unary_rpc_method_handler(
            service.GetCapabilities, request_deserializer=pb.GetCapabilitiesRequest.FromString,
            response_serializer=pb.Capabilities.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def client_identity(context: grpc.ServicerContext) -> str:
    """Who a call comes from, for per-client limits: its certificate's identity under mutual TLS, else the
    peer's address without the port."""
    identities = context.peer_identities()
    if identities:
        return "cert:" + ",".join(name.decode("utf-8", "replace") for name in identities)
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


def _request_id(context: grpc.ServicerContext) -> str:
    """The client's request id (the SDK sends one per layer), or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:64]
    return uuid.uuid4().hex


class _Slot:
    """An admitted call's place in the concurrency gate, given back once, by whoever ends the call first."""

    def __init__(self, gate: ConcurrencyGate, client: str, changed: threading.Condition) -> None:
        self._gate = gate
        self._client: str | None = client
        self._changed = changed  # notified, for a drain waiting for the gate to empty
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._gate.leave(client)
            with self._changed:
                self._changed.notify_all()


def _read_header(requests: Iterator, clock: CallClock) -> pb.PrepareHeader:
    """The first message, which must be the header; the watchdog ends a call that sends none in time."""
    first = next(requests, None)
    clock.header_arrived()
    if first is None and clock.expired is not None:
        raise clock.expired
    if first is None or chunk_of(first) is not None:
        raise invalid("request.header", "did not come first", "a PrepareHeader as the first message")
    return first.header


def _outcome(context: grpc.ServicerContext, failure: Status | None, finished: bool) -> str:
    """How a call ended, for ``outcomes``."""
    if failure is None and finished:
        return "OK"
    if context.is_active():
        return failure.code.name if failure is not None else "CANCELLED"
    # The client went away: whatever error that caused here, the call was cancelled or timed out.
    timed_out = failure is not None and failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    return "DEADLINE_EXCEEDED" if timed_out or context.time_remaining() == 0 else "CANCELLED"
