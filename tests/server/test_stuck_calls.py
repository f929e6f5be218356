"""Calls whose server side blocks past their deadline, in a stage that nothing interrupts (every content-hashing
thread busy): the watchdog ends them blaming the server, not the client (which it blames only when the client
stopped), and gives their slots back at once; draining and SIGTERM finish within --drain-timeout plus a margin
all the same.

(Checkpoint reads that never return are bounded by their deadline on the reader threads: see
test_bounded_runner.py, which blocks real reads of a pipe; a hung mount itself cannot be made without root.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from nvfp4_prep.client import PrepClient
from nvfp4_prep.server.server import EXIT_MARGIN, STOP_MARGIN
from nvfp4_prep.server.service import HASH_THREADS
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import encode_tensors, header_for
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutlass"
PREFIX = "model.layers.0.mlp.experts"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layer():
    return random_layer(2, 256, 128)


def requests(layer, uploaded: threading.Event | None = None):
    yield pb.PrepareRequest(header=pb.PrepareHeader(
        backend=BACKEND, activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[header_for(n, t) for n, t in layer.items()])))
    for chunk in encode_tensors(layer, 64 << 10):
        yield pb.PrepareRequest(chunk=chunk)
    if uploaded is not None:
        uploaded.set()


def block_hashing(server) -> threading.Event:
    """Holds every content-hashing thread of ``server`` until the returned event is set."""
    release = threading.Event()
    for _ in range(HASH_THREADS):
        server.service.hash_pool.submit(release.wait)
    return release


def test_calls_stuck_server_side_past_the_ceiling_give_their_slots_back(start_server, raw_stub, layer, tmp_path):
    write_checkpoint(tmp_path / "ckpt", {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64)})
    server = start_server(max_concurrent=2, max_deadline=1, cache_bytes=64 << 20, allowed_roots=(tmp_path,))
    release = block_hashing(server)
    stub = raw_stub(server.address)
    try:
        for _ in range(3):  # more than --max-concurrent: each must have given its slot back
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Prepare(requests(layer), timeout=60))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
            details = info.value.details()
            assert "--max-deadline=1s" in details
            assert "the server itself was still hashing the received tensors" in details
            assert "client stopped" not in details
            wait_for(lambda: server.service.gate.in_flight == 0)
        assert server.service.in_flight == 3  # their handlers still wait for the hashing threads
        # A call that needs no hashing (a checkpoint reference) is served meanwhile.
        with PrepClient(server.address, retries=0) as client:
            assert client.prepare_reference(str(tmp_path / "ckpt"), PREFIX, BACKEND).layout["backend"] == BACKEND
    finally:
        release.set()
    wait_for(lambda: idle(server), timeout=30)
    assert server.service.outcomes == {"DEADLINE_EXCEEDED": 3, "OK": 1}


def test_a_client_that_stops_sending_is_the_one_blamed(start_server, raw_stub, layer):
    server = start_server(max_deadline=1)
    stop = threading.Event()

    def header_then_nothing():
        yield next(requests(layer))
        stop.wait(60)

    try:
        with pytest.raises(grpc.RpcError) as info:
            list(raw_stub(server.address).Prepare(header_then_nothing(), timeout=60))
    finally:
        stop.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for its client to send, and the client stopped" in info.value.details()
    assert "server itself" not in info.value.details()
    wait_for(lambda: idle(server))


def test_drain_finishes_in_time_while_a_handler_stays_blocked(start_server, raw_stub, layer):
    server = start_server(cache_bytes=64 << 20)
    release = block_hashing(server)
    uploaded = threading.Event()
    call = raw_stub(server.address).Prepare(requests(layer, uploaded), timeout=60)  # sends on its own
    try:
        assert uploaded.wait(10)
        wait_for(lambda: server.workers[0].budget.in_use > 0)
        started = time.monotonic()
        assert server.drain(timeout=0.5) is False  # the handler never returned
        assert time.monotonic() - started < 0.5 + STOP_MARGIN + 10
        assert call.code() == grpc.StatusCode.UNAVAILABLE  # the stopping server cut it
    finally:
        release.set()
    wait_for(lambda: server.service.in_flight == 0, timeout=30)


def test_sigterm_exits_within_the_drain_timeout_while_a_handler_stays_blocked(layer):
    drain = 1.0
    process = subprocess.Popen([sys.executable, "-m", "tests.helpers.blocked_server", str(drain)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        uploaded = threading.Event()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = prep_pb2_grpc.PrepStub(channel).Prepare(requests(layer, uploaded), timeout=60)  # sends on its own
        assert uploaded.wait(30)
        time.sleep(1)  # the last chunks reach the server, which then waits for its hashing threads
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            _, log = process.communicate(timeout=drain + STOP_MARGIN + EXIT_MARGIN + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("no exit:\n" + process.communicate()[1][-5000:]) from None
        took = time.monotonic() - started
        assert call.code() == grpc.StatusCode.UNAVAILABLE  # the stopping server cut it
        channel.close()
        assert process.returncode == 0, log[-3000:]
        assert took < drain + STOP_MARGIN + EXIT_MARGIN + 30, took  # it never exits otherwise: a generous bound
        assert "threads still busy" in log and "leaving them behind" in log, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
