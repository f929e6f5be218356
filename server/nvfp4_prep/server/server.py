"""The running server: gRPC with the Prep service, health checking and reflection, and shutdown.

SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new and queued Prepare
calls get UNAVAILABLE, running ones get up to --drain-timeout to finish, then
the server stops and the process exits, within --drain-timeout plus
``STOP_MARGIN`` and ``EXIT_MARGIN`` seconds whatever a thread is doing: reader
threads are daemons, and a thread that still has not returned (a stage that
cannot be interrupted) is left behind by ``os._exit`` after the logs are
flushed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import MESSAGE_OVERHEAD

from . import logs
from .auth import TokenAuthInterceptor
from .bulk.connection import BulkHub
from .bulk.listener import BulkListener
from .bulk.tickets import TicketBook
from .cache import PreparedCache
from .capabilities import build_capabilities
from .config import ConfigError, ServeConfig
from .deadline import Ceiling
from .device_probe import LIVENESS_NAME, DeviceProbe, device_checks
from .limits import RequestLimits
from .metrics import Metrics
from .metrics_http import MetricsHttpServer, serve_metrics
from .refusals import RefusalLog
from .service import PrepService, add_to_server
from .tls import https_context
from .transport import HealthPort, channel_options, interceptors, listen
from .worker import DeviceWorker, auto_budget, resolve_devices

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prep"].full_name
# "" is the whole server (start-up probe), the Prep service readiness, LIVENESS_NAME liveness (the device probe).
HEALTH_NAMES = ("", SERVICE_NAME, LIVENESS_NAME)
# Request chunks up to this size are always accepted, whatever --chunk-size says.
MIN_ACCEPTED_CHUNK = 4 << 20
# Threads beyond --max-concurrent in the pool that Prepare streams, health checks, capabilities and
# reflection share, so that health is answered and extra calls are refused even at the limit; and as many
# again as --max-concurrent for streams still waiting for their header (each holds a thread meanwhile).
SPARE_THREADS = 16
# Seconds a stopping server waits for its handler threads to return once every call was cancelled.
STOP_MARGIN = 5.0
# Seconds a stopped server's process waits for its last threads before it exits without them.
EXIT_MARGIN = 2.0


class PrepServer:
    """A configured server; ``start()``, then ``drain()`` or ``stop()``."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        receive_limit = max(config.chunk_size, MIN_ACCEPTED_CHUNK) + MESSAGE_OVERHEAD
        send_limit = config.chunk_size + MESSAGE_OVERHEAD
        devices = resolve_devices(config.devices)
        self.workers = [
            DeviceWorker(device, config.memory_budget or auto_budget(device), receive_limit) for device in devices
        ]
        self.cache = PreparedCache(config.cache_bytes)
        request_limits = RequestLimits(config.max_request_bytes, config.max_tensors, config.max_tensor_rank,
                                       config.max_tensor_bytes, config.max_concurrent,
                                       config.max_concurrent_per_client)
        limits = pb.Limits(
            chunk_size=config.chunk_size,
            max_receive_message_bytes=receive_limit,
            max_send_message_bytes=send_limit,
            max_request_bytes=admissible_request_bytes(config.max_request_bytes, self.workers),
            cache_bytes=config.cache_bytes,
            max_tensors=config.max_tensors,
            max_tensor_rank=config.max_tensor_rank,
            max_tensor_bytes=config.max_tensor_bytes,
            max_concurrent=config.max_concurrent,
            max_concurrent_per_client=config.max_concurrent_per_client,
            max_deadline_seconds=config.max_deadline,
        )
        self.metrics = Metrics([str(worker.device) for worker in self.workers])
        self.metrics.watch(self.workers, self.cache)
        self.metrics_server: MetricsHttpServer | None = None
        self.ceiling = Ceiling(config.max_deadline, config.header_timeout, config.idle_timeout)
        self.bulk = bulk_listener(config, self.metrics)
        hub = None
        if self.bulk is not None:
            hub = BulkHub(self.bulk.book, self.bulk.port, advertised_bulk_host(config), self.ceiling.idle_seconds,
                          receive_limit)
        capabilities = build_capabilities(self.workers, limits, bool(config.allowed_roots),
                                          self.bulk.port if self.bulk is not None else 0)
        self.service = PrepService(self.workers, self.cache, config.chunk_size, config.allowed_roots, capabilities,
                                   self.metrics, request_limits, self.ceiling, hub,
                                   ipc_lease_seconds=config.ipc_lease_timeout)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # A wedged device turns liveness (and readiness) NOT_SERVING; on the CPU it stays SERVING.
        self.device_probe = DeviceProbe(self.health, device_checks(w.device for w in self.workers),
                                        (LIVENESS_NAME, SERVICE_NAME))
        auth = interceptors(config)
        # One refusal log for the gRPC port and /metrics: refused calls are counted and logged together.
        self.refusals = next((i.refusals for i in auth if isinstance(i, TokenAuthInterceptor)), RefusalLog())
        self.metrics.watch_refusals(self.refusals)
        self._rpc_pool = ThreadPoolExecutor(2 * config.max_concurrent + SPARE_THREADS,
                                            thread_name_prefix="nvfp4-prep-rpc")
        self._server = grpc.server(
            self._rpc_pool,
            interceptors=auth,
            options=[
                ("grpc.max_receive_message_length", receive_limit),
                ("grpc.max_send_message_length", send_limit),
                ("grpc.so_reuseport", 0),
                *channel_options(config),
            ],
        )
        add_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        self.health_port: HealthPort | None = None
        self._stopped = threading.Event()
        try:
            self.port = listen(self._server, config)
            if config.health_port:
                self.health_port = HealthPort(self.health, config.host, config.health_port)
        except ConfigError:
            self.stop(grace=0)
            raise

    @property
    def address(self) -> str:
        """``host:port`` a client on this machine can dial."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> PrepServer:
        if self.config.metrics_port:
            try:
                self.metrics_server = serve_metrics(self.config, self.metrics.page, self.refusals)
            except ConfigError:
                self.stop(grace=0)
                raise
        self._server.start()
        if self.bulk is not None:
            self.bulk.start()
        if self.health_port is not None:
            self.health_port.start()
        for name in HEALTH_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.device_probe.start()
        config = self.config
        log.info("serving %s on %s:%d (%s%s%s%s) with %s", SERVICE_NAME, config.host, self.port,
                 "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext",
                 ", bearer token" if config.auth_token_file else "",
                 f", health also on plaintext port {self.health_port.port}" if self.health_port else "",
                 f", bulk transport on port {self.bulk.port}" if self.bulk is not None else "",
                 ", ".join(f"{w.device} (budget {w.budget.capacity} bytes)" for w in self.workers),
                 extra={"port": self.port, "health_port": self.health_port.port if self.health_port else 0,
                        "bulk_port": self.bulk.port if self.bulk is not None else 0})
        return self

    def drain(self, timeout: float | None = None) -> bool:
        """Graceful shutdown; True if every running call finished within ``timeout`` (default --drain-timeout)
        and every handler returned."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        log.info("draining: health NOT_SERVING, up to %.1fs for %d running calls", timeout,
                 self.service.gate.in_flight)
        self.health.enter_graceful_shutdown()
        self.service.begin_drain()
        drained = self.service.wait_idle(timeout)
        if not drained:
            log.warning("drain timeout: cancelling %d running calls", self.service.gate.in_flight)
        return self.stop(grace=0) and drained

    def stop(self, grace: float | None = None) -> bool:
        """Stops serving and ends every thread the server started (its pools, the watchdog, /metrics); False if a
        Prepare handler had still not returned ``STOP_MARGIN`` seconds after its call was cancelled."""
        if self.bulk is not None:  # first: a call blocked on a bulk connection then fails at once
            self.bulk.stop()
        self._server.stop(grace).wait()
        self._rpc_pool.shutdown(wait=False, cancel_futures=True)
        returned = self.service.wait_handlers(STOP_MARGIN)
        if not returned:
            log.error("%d Prepare handlers still had not returned %.0fs after their calls were cancelled",
                      self.service.in_flight, STOP_MARGIN)
        if self.health_port is not None:
            self.health_port.stop(grace)
        self.device_probe.stop()
        self.service.close()
        self.ceiling.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self._stopped.set()
        return returned

    def wait(self) -> None:
        self._stopped.wait()


def admissible_request_bytes(max_request_bytes: int, workers: list[DeviceWorker]) -> int:
    """The largest layer a request may stream and still be admitted: --max-request-bytes, but at most half
    the largest memory budget, since a request holds its inputs and its prepared outputs at once."""
    admissible = max(worker.budget.capacity for worker in workers) // 2
    return min(max_request_bytes, admissible) if max_request_bytes else admissible


def bulk_listener(config: ServeConfig, metrics: Metrics) -> BulkListener | None:
    """The bulk port of --bulk-address (None when it is off), TLS with the gRPC port's certificate and client CA
    when the gRPC port runs TLS."""
    if config.bulk_address is None:
        return None
    context = None
    if config.tls_cert is not None and config.tls_key is not None:
        context = https_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    host, port = config.bulk_address
    return BulkListener(host, port, TicketBook(config.bulk_ticket_timeout), metrics, context)


def advertised_bulk_host(config: ServeConfig) -> str:
    """The host a BulkOffer names: --bulk-advertise-host, else the bulk address's own host unless it is a
    wildcard, else "" (the client dials the host its channel targets)."""
    if config.bulk_advertise_host:
        return config.bulk_advertise_host
    host = config.bulk_address[0] if config.bulk_address is not None else ""
    return "" if host in ("0.0.0.0", "::", "[::]", "") else host.removeprefix("[").removesuffix("]")


def run(config: ServeConfig) -> int:
    """``nvfp4-prep serve``: serves until SIGTERM or SIGINT, then drains."""
    logs.configure(config.log_level, config.log_format)
    return serve_until_signalled(PrepServer(config).start())


def serve_until_signalled(server: PrepServer) -> int:
    """Serves ``server`` (started) until SIGTERM or SIGINT, drains it and returns the exit status; a handler
    thread that never returned is left behind by ending the process (``os._exit``)."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=server.drain, name="nvfp4-prep-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    busy = _threads_left(EXIT_MARGIN)
    if busy:
        # A thread that never returns would hold the interpreter's exit (which joins the pools' threads) past
        # what the orchestrator waits for: leave it behind, as SIGKILL would.
        log.error("exiting with %d threads still busy (%s): leaving them behind", len(busy),
                  ", ".join(thread.name for thread in busy))
        logging.shutdown()
        os._exit(0)
    return 0


def _threads_left(margin: float) -> list[threading.Thread]:
    """The threads that the interpreter's exit would wait for, still running after up to ``margin`` seconds."""
    end = time.monotonic() + margin
    left = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(end - time.monotonic(), 0.0))
        if thread.is_alive():
            left.append(thread)
    return left
