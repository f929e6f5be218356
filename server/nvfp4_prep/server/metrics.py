"""Prometheus metrics of the nvfp4-prep server, served over HTTP on their own port.

All metrics of one server live in one ``Metrics`` object with its own
``CollectorRegistry``: two servers in one process (as in tests) count apart,
and nothing that other libraries put in prometheus-client's global registry
leaks onto the page. The server creates one ``Metrics``, passes it to the
parts that count, and serves ``Metrics.page`` with ``metrics_http`` unless
``--metrics-port`` is 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .refusals import RefusalLog

NAMESPACE = "nvfp4_prep"

# Where a Prepare request spends its time, in order.
STAGES = ("read", "host_to_device", "prepare", "device_to_host", "send")
# Where received tensor bytes come from: the request stream, or a checkpoint
# read from the model store.
SOURCES = ("stream", "checkpoint")
# Backend label of Prepare requests that failed before their backend was known.
UNKNOWN_BACKEND = "unknown"
# The methods that have a backend; the others (GetCapabilities) get an empty backend label, which
# Prometheus reads as no label at all.
BACKEND_METHODS = frozenset({"Prepare"})

# From a millisecond (a small layer's host-to-device copy) to ten minutes, the default --max-deadline that
# no call outlives.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
# Metric types whose prometheus-client samples include a ``_created`` timestamp.
_WITH_CREATED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


class GpuMemoryCollector(Collector):
    """Reads the CUDA memory of the server's devices at scrape time.

    Reports nothing for ``cpu`` devices or where CUDA is absent, so a CPU
    server's page simply has no samples for these metrics.
    """

    _FAMILIES = (
        ("gpu_memory_allocated_bytes", "Bytes held in tensors by this process's CUDA caching allocator."),
        ("gpu_memory_reserved_bytes", "Bytes this process's CUDA caching allocator has reserved from the device."),
        ("gpu_memory_free_bytes", "Free bytes on the device, all processes counted."),
        ("gpu_memory_total_bytes", "Total bytes of device memory."),
    )

    def __init__(self, devices: Iterable[str]) -> None:
        self._devices = tuple(device for device in devices if device.startswith("cuda"))

    def describe(self) -> Iterator[Metric]:
        # Names without samples: registering must not touch the GPU.
        for name, text in self._FAMILIES:
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=["device"])

    def collect(self) -> Iterator[Metric]:
        families = [GaugeMetricFamily(f"{NAMESPACE}_{name}", text, labels=["device"])
                    for name, text in self._FAMILIES]
        if self._devices and torch.cuda.is_available():
            for device in self._devices:
                free, total = torch.cuda.mem_get_info(device)
                values = (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), free, total)
                for family, value in zip(families, values, strict=True):
                    family.add_metric([device], float(value))
        yield from families


class RefusalCollector(Collector):
    """Reads a ``RefusalLog``'s counts at scrape time as ``nvfp4_prep_auth_refusals_total{listener,reason}``."""

    def __init__(self, refusals: RefusalLog) -> None:
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(f"{NAMESPACE}_auth_refusals", "Calls refused for want of a valid bearer "
                                     "token, by listener (grpc, metrics) and reason (no_token, unknown_token).",
                                     labels=["listener", "reason"])
        for (listener, reason), count in self._refusals.counts().items():
            family.add_metric([listener, reason], count)
        yield family


class _WithoutCreated(Collector):
    """A registry's metrics without prometheus-client's ``_created`` samples.

    In the text format each counter and histogram child would show up twice,
    as ``..._total`` and as a ``..._created`` gauge of its creation time, which
    doubles the series count for nothing a dashboard uses. prometheus-client
    only switches them off process-wide; this view drops them for one page.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            if metric.type in _WITH_CREATED:
                metric.samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            yield metric


class Metrics:
    """The server's metrics; attributes are prometheus-client metrics to update directly.

    ``requests`` (method, backend, code) counts finished RPCs by their gRPC
    status name; ``request_seconds`` (method, backend) their duration;
    ``stage_seconds`` (stage, backend) the time of each stage in ``STAGES``;
    ``received_bytes`` (backend, source) and ``sent_bytes`` (backend) tensor
    payload bytes; ``checkpoint_read_bytes`` (backend) tensor bytes of the layers
    read from checkpoint files; ``inflight`` (method) RPCs being served; ``queue_depth``
    (device) requests waiting for memory budget; ``memory_budget_bytes`` and
    ``memory_in_use_bytes`` (device) the budget and how much of it is held;
    ``cache_hits``, ``cache_misses`` and ``cache_bytes`` the prepared-layer
    cache; ``bulk_refused`` (reason) refused bulk connections. GPU memory is
    read at scrape time (``GpuMemoryCollector``), and so are refused calls
    (``watch_refusals``). ``page`` is what ``/metrics`` serves:
    the registry without ``_created`` series.
    """

    def __init__(self, devices: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.page: Collector = _WithoutCreated(registry)

        self.requests = Counter(
            "requests", "Finished RPCs by method, backend and gRPC status code.",
            ["method", "backend", "code"], namespace=NAMESPACE, registry=registry)
        self.request_seconds = Histogram(
            "request_duration_seconds", "Wall time of finished RPCs.",
            ["method", "backend"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=registry)
        self.stage_seconds = Histogram(
            "stage_duration_seconds", "Wall time of each stage of a Prepare request: " + ", ".join(STAGES) + ".",
            ["stage", "backend"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=registry)
        self.received_bytes = Counter(
            "received_bytes", "Tensor bytes taken in, from the request stream or a checkpoint.",
            ["backend", "source"], namespace=NAMESPACE, registry=registry)
        self.checkpoint_read_bytes = Counter(
            "checkpoint_read_bytes",
            "Tensor bytes of the layers read from checkpoint files (for a rank shard, the rank's only).",
            ["backend"], namespace=NAMESPACE, registry=registry)
        self.sent_bytes = Counter(
            "sent_bytes", "Prepared tensor bytes sent to clients.",
            ["backend"], namespace=NAMESPACE, registry=registry)
        self.inflight = Gauge(
            "inflight_requests", "RPCs being served now.",
            ["method"], namespace=NAMESPACE, registry=registry)
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for memory budget on a device.",
            ["device"], namespace=NAMESPACE, registry=registry)
        self.memory_budget_bytes = Gauge(
            "memory_budget_bytes", "Bytes of tensors a device's worker may hold at once (--memory-budget).",
            ["device"], namespace=NAMESPACE, registry=registry)
        self.memory_in_use_bytes = Gauge(
            "memory_budget_in_use_bytes", "Bytes of the memory budget held by running requests.",
            ["device"], namespace=NAMESPACE, registry=registry)
        self.bulk_refused = Counter(
            "bulk_refused", "Bulk connections refused, by reason: unknown, replayed, expired or revoked ticket, "
            "malformed hello, failed handshake (TLS, or no hello in time), busy (too many handshakes at once).",
            ["reason"], namespace=NAMESPACE, registry=registry)
        self.cache_hits = Counter(
            "cache_hits", "Prepare requests answered from the prepared-layer cache.",
            namespace=NAMESPACE, registry=registry)
        self.cache_misses = Counter(
            "cache_misses", "Cacheable Prepare requests that had to be prepared.",
            namespace=NAMESPACE, registry=registry)
        self.cache_bytes = Gauge(
            "cache_bytes", "Bytes held by the prepared-layer cache.",
            namespace=NAMESPACE, registry=registry)
        build = Info("build", "Versions this server runs.", namespace=NAMESPACE, registry=registry)
        build.info({"version": _package_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda or "none"})
        registry.register(GpuMemoryCollector(devices))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def watch(self, workers: Iterable, cache) -> None:
        """Reads the workers' memory budgets and the cache's size at scrape time."""
        for worker in workers:
            device, budget = str(worker.device), worker.budget
            self.queue_depth.labels(device).set_function(lambda budget=budget: budget.waiting)
            self.memory_budget_bytes.labels(device).set(budget.capacity)
            self.memory_in_use_bytes.labels(device).set_function(lambda budget=budget: budget.in_use)
        self.cache_bytes.set_function(lambda: cache.bytes)

    def watch_refusals(self, refusals: RefusalLog) -> None:
        """Reads ``refusals``' counts at scrape time."""
        self.registry.register(RefusalCollector(refusals))

    @contextmanager
    def stage_timer(self, stage: str, backend: str) -> Iterator[None]:
        """Times the ``with`` block as one ``stage`` of a request; failed blocks count too."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage, backend).observe(time.perf_counter() - start)

    def observe_request(self, method: str, backend: str, code: str, seconds: float) -> None:
        """Records one finished RPC; ``code`` is the gRPC status name, e.g. ``"OK"`` or ``"INVALID_ARGUMENT"``.
        ``backend`` is kept only for ``BACKEND_METHODS``."""
        backend = backend if method in BACKEND_METHODS else ""
        self.requests.labels(method, backend, code).inc()
        self.request_seconds.labels(method, backend).observe(seconds)


def _package_version() -> str:
    try:
        return version("nvfp4-prep")
    except PackageNotFoundError:
        return "unknown"
