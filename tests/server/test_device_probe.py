"""The device probe behind the liveness health name: a device call that hangs or fails turns liveness and readiness
NOT_SERVING, seen through a real grpc.health.v1 client on loopback; a CPU server answers SERVING."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nvfp4_prep.server.device_probe import LIVENESS_NAME, DeviceProbe
from nvfp4_prep.server.server import SERVICE_NAME

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Generous bounds for a loaded 2-core machine; the probe itself runs every 0.05 s with a 0.5 s timeout.
WAIT = 30.0


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, health_pb2_grpc.HealthStub]]:
    """A real gRPC server on loopback serving only a health servicer, and a client stub for it."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    server = grpc.server(ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, health_pb2_grpc.HealthStub(channel)
    channel.close()
    server.stop(0).wait()


def status(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status


def wait_for(stub: health_pb2_grpc.HealthStub, name: str, wanted: int) -> float:
    """Seconds until ``name`` reports ``wanted``; fails after ``WAIT``."""
    start = time.monotonic()
    while status(stub, name) != wanted:
        if time.monotonic() - start > WAIT:
            pytest.fail(f"{name!r} did not turn {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)} "
                        f"within {WAIT:.0f}s")
        time.sleep(0.02)
    return time.monotonic() - start


def probe(servicer: health.HealthServicer, check: Callable[[], None]) -> DeviceProbe:
    return DeviceProbe(servicer, [check], (LIVENESS_NAME, SERVICE_NAME), interval=0.05, timeout=0.5)


def test_a_hanging_device_call_turns_liveness_and_readiness_not_serving(health_server):
    servicer, stub = health_server
    release = threading.Event()
    calls = []

    def hanging_device() -> None:
        calls.append(time.monotonic())
        if len(calls) > 2:  # the first checks pass, then the device wedges
            release.wait()

    device_probe = probe(servicer, hanging_device).start()
    try:
        assert status(stub, LIVENESS_NAME) == SERVING
        wait_for(stub, LIVENESS_NAME, NOT_SERVING)
        assert status(stub, SERVICE_NAME) == NOT_SERVING
        # While the call hangs no second one is started on top of it.
        count = len(calls)
        time.sleep(0.3)
        assert len(calls) == count
        # The device answers again: so does the pod.
        release.set()
        wait_for(stub, LIVENESS_NAME, SERVING)
        assert status(stub, SERVICE_NAME) == SERVING
    finally:
        release.set()
        device_probe.stop()


def test_a_failing_device_call_turns_liveness_not_serving(health_server):
    servicer, stub = health_server

    def broken_device() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    device_probe = probe(servicer, broken_device).start()
    try:
        wait_for(stub, LIVENESS_NAME, NOT_SERVING)
        assert status(stub, SERVICE_NAME) == NOT_SERVING
    finally:
        device_probe.stop()


def test_a_drain_is_not_undone_by_a_passing_device_call(health_server):
    servicer, stub = health_server
    calls = threading.Semaphore(0)
    device_probe = probe(servicer, calls.release).start()
    try:
        assert calls.acquire(timeout=WAIT)
        servicer.enter_graceful_shutdown()
        for _ in range(2):  # two more checks pass after the drain began ...
            assert calls.acquire(timeout=WAIT)
        assert status(stub, LIVENESS_NAME) == NOT_SERVING  # ... and liveness stays NOT_SERVING for the drain
    finally:
        device_probe.stop()


def test_probe_timing_must_be_positive(health_server):
    servicer, _ = health_server
    with pytest.raises(ValueError, match="interval and timeout must be positive"):
        DeviceProbe(servicer, [], (LIVENESS_NAME,), interval=0, timeout=1)


def test_cpu_server_answers_liveness_serving(start_server):
    server = start_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert status(stub, LIVENESS_NAME) == SERVING
        assert status(stub, SERVICE_NAME) == SERVING
        assert status(stub, "") == SERVING
