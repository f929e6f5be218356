"""Admission, deadlines, cancellation, draining, retries, replicas, health and reflection on a real server."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nvfp4_prep import pipeline
from nvfp4_prep.client import (
    PrepClient,
    PrepDeadlineExceeded,
    PrepResourceExhausted,
    PrepUnavailable,
    Progress,
)
from nvfp4_prep.contract import layout
from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.server import PrepServer
from nvfp4_prep.server.service import HASH_THREADS
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import encode_tensors, header_for
from tests.helpers.held_call import BACKEND, HeldCall, need_of
from tests.helpers.server_state import idle, wait_for

# -- admission control -----------------------------------------------------------------------------

def test_burst_queues_within_the_budget_and_all_succeed(start_server, raw_stub, make_layer, same_tensors):
    layer = make_layer(experts=4, hidden=512, inter=256)
    need = need_of(layer)
    server = start_server(memory_budget=need + need // 2)
    budget = server.workers[0].budget
    held = HeldCall(raw_stub(server.address), layer)
    wait_for(lambda: budget.in_use == need)
    results: list[object] = []

    def run() -> None:
        with PrepClient(server.address) as client:
            results.append(client.prepare_layer(layer, BACKEND))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: budget.waiting == 4)
    assert results == [] and budget.in_use == need
    assert not isinstance(held.release(), grpc.RpcError)
    for thread in threads:
        thread.join(30)
    want = pipeline.prepare(layer, BACKEND).tensors
    assert len(results) == 4
    for result in results:
        same_tensors(result.tensors, want)
    assert server.service.outcomes["OK"] == 5
    wait_for(lambda: idle(server))


def test_layer_larger_than_the_budget_is_resource_exhausted(start_server, make_layer):
    layer = make_layer()
    server = start_server(memory_budget=need_of(layer) - 1)
    with PrepClient(server.address) as client, pytest.raises(PrepResourceExhausted) as info:
        client.prepare_layer(layer, BACKEND)
    assert info.value.field == "memory_budget" and "--memory-budget" in info.value.details


def test_deadline_passes_while_queued(start_server, raw_stub, make_layer):
    layer = make_layer()
    server = start_server(memory_budget=need_of(layer))
    held = HeldCall(raw_stub(server.address), layer)
    wait_for(lambda: server.workers[0].budget.in_use > 0)
    started = time.monotonic()
    with PrepClient(server.address) as client, pytest.raises(PrepDeadlineExceeded):
        client.prepare_layer(layer, BACKEND, timeout=0.5)
    assert time.monotonic() - started < 5
    wait_for(lambda: server.workers[0].budget.waiting == 0)
    held.release()
    wait_for(lambda: idle(server))


# -- cancellation ----------------------------------------------------------------------------------

def test_cancel_during_upload_frees_everything(start_server, raw_stub, make_layer):
    server = start_server()
    layer = make_layer(experts=8, hidden=1024, inter=512)
    with PrepClient(server.address) as client:  # warm-up: the idle level after one full call
        client.prepare_layer(layer, BACKEND)
    wait_for(lambda: idle(server))
    held = HeldCall(raw_stub(server.address), layer, chunks_first=20)
    wait_for(lambda: server.workers[0].live.value > 0 and server.workers[0].budget.in_use > 0)
    held.cancel()
    wait_for(lambda: idle(server))
    # The server sees the cancellation either as such or, in a race inside grpc, as a stream
    # that ended early; either way the call failed and freed everything.
    wait_for(lambda: server.service.outcomes["CANCELLED"] + server.service.outcomes["INVALID_ARGUMENT"] == 1)
    assert server.service.outcomes["OK"] == 1


def test_cancel_during_download_frees_everything(start_server, make_layer):
    server = start_server(chunk_size=64 << 10)
    layer = make_layer(experts=16, hidden=1024, inter=512)

    class Stop(Exception):
        pass

    def stop_at_first_download(event: Progress) -> None:
        if event.phase == "download":
            raise Stop

    with PrepClient(server.address) as client, pytest.raises(Stop):
        client.prepare_layer(layer, BACKEND, progress=stop_at_first_download)
    wait_for(lambda: idle(server))
    wait_for(lambda: server.service.outcomes["CANCELLED"] == 1)
    assert server.service.outcomes["OK"] == 0


def test_progress_callback_error_during_upload_stops_the_call(start_server, make_layer):
    server = start_server()

    def stop_at_second_upload_chunk(event: Progress) -> None:
        if event.phase == "upload" and event.done > 64 << 10:
            raise KeyboardInterrupt

    with PrepClient(server.address, chunk_size=64 << 10) as client, pytest.raises(KeyboardInterrupt):
        client.prepare_layer(make_layer(experts=8, hidden=1024, inter=512), BACKEND,
                             progress=stop_at_second_upload_chunk)
    wait_for(lambda: idle(server))
    assert server.service.outcomes["OK"] == 0


@pytest.mark.parametrize("per_expert_form", [False, True])
def test_memory_held_while_the_answer_streams(start_server, make_layer, per_expert, per_expert_form):
    server = start_server(chunk_size=64 << 10)
    worker = server.workers[0]
    stacked = make_layer(experts=8, hidden=1024, inter=512)
    layer = per_expert(stacked) if per_expert_form else stacked
    held: list[tuple[int, int]] = []

    def look(event: Progress) -> None:
        if event.phase == "download" and not held:
            held.append((worker.live.value, worker.budget.in_use))

    with PrepClient(server.address) as client:
        got = client.prepare_layer(layer, BACKEND, progress=look)
    outputs = sum(t.numel() * t.element_size() for t in got.tensors.values())
    inputs = sum(t.numel() * t.element_size() for t in stacked.values())
    live, reserved = held[0]
    if per_expert_form:  # received whole, then prepared: the inputs are freed before the answer streams
        # What stays beyond the outputs is at most the [E] float32 input that w2_weight_scale_2 aliases.
        assert outputs <= live <= outputs + 8 * 4
        assert reserved == outputs
    else:  # answered while it arrives: the inputs and the prepared weights, within the call's whole reservation
        assert inputs < live <= inputs + outputs <= reserved
    wait_for(lambda: idle(server))


def test_call_cancelled_between_upload_and_compute_counts_as_cancelled(start_server, raw_stub, make_layer):
    server = start_server(cache_bytes=64 << 20)
    layer = make_layer()
    # Every hashing thread waits on ``hashing``, so the call stops after its upload, at its content hash.
    hashing = threading.Event()
    blockers = [server.service.hash_pool.submit(hashing.wait) for _ in range(HASH_THREADS)]
    uploaded = threading.Event()

    def requests():
        yield pb.PrepareRequest(header=pb.PrepareHeader(
            backend=BACKEND, activation="swiglu", input_scale_policy="max",
            tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[header_for(n, t) for n, t in layer.items()])))
        for chunk in encode_tensors(layer, 64 << 10):
            yield pb.PrepareRequest(chunk=chunk)
        uploaded.set()

    call = raw_stub(server.address).Prepare(requests(), timeout=60)
    assert uploaded.wait(10)
    time.sleep(0.3)  # the last chunks reach the server, which then waits for its hash
    call.cancel()
    time.sleep(0.3)  # the server sees the cancellation
    hashing.set()
    for blocker in blockers:
        blocker.result(10)
    wait_for(lambda: idle(server) and sum(server.service.outcomes.values()) == 1)
    assert server.service.outcomes == {"CANCELLED": 1}
    assert server.metrics.registry.get_sample_value(
        "nvfp4_prep_requests_total", {"method": "Prepare", "backend": BACKEND, "code": "CANCELLED"}) == 1
    assert not server.metrics.registry.get_sample_value(
        "nvfp4_prep_stage_duration_seconds_count", {"stage": "prepare", "backend": BACKEND})


# -- draining --------------------------------------------------------------------------------------

def test_drain_refuses_new_calls_and_finishes_running_ones(start_server, raw_stub, make_layer):
    server = start_server()
    layer = make_layer()
    held = HeldCall(raw_stub(server.address), layer)
    # Admitted, not only connected: a stream counts for the drain once its header has arrived.
    wait_for(lambda: server.service.gate.in_flight == 1)
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(server.drain(timeout=20)))
    drainer.start()
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="nvfp4_prep.v1.Prep")).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    with PrepClient(server.address, retries=0) as client, pytest.raises(PrepUnavailable, match="draining"):
        client.prepare_layer(layer, BACKEND)
    responses = held.release()
    assert not isinstance(responses, grpc.RpcError)
    assert responses[0].header.layout.backend == BACKEND
    drainer.join(30)
    assert drained == [True]


# -- retries and replicas --------------------------------------------------------------------------

def test_unavailable_is_retried_until_the_server_is_up(start_server, make_layer, same_tensors):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    starter = threading.Timer(0.5, lambda: start_server(port=port))
    starter.start()
    layer = make_layer()
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    try:
        with PrepClient(f"127.0.0.1:{port}", retries=8, backoff=0.1, max_backoff=0.5,
                        options=fast_reconnect) as client:
            got = client.prepare_layer(layer, BACKEND, timeout=30)
    finally:
        starter.join()
    same_tensors(got.tensors, pipeline.prepare(layer, BACKEND).tensors)


@pytest.mark.parametrize("channels", [1, 2])
def test_round_robin_spreads_layers_over_replicas(start_server, make_layer, same_tensors, channels):
    servers = [start_server(), start_server()]
    layers = [make_layer(seed=seed) for seed in range(6)]
    with PrepClient([s.address for s in servers], channels=channels) as client:
        results = list(client.prepare_layers(layers, BACKEND, concurrency=3))
    for layer, result in zip(layers, results, strict=True):
        same_tensors(result.tensors, pipeline.prepare(layer, BACKEND).tensors)
    served = [s.service.outcomes["OK"] for s in servers]
    assert sum(served) == 6 and min(served) >= 1, served


# -- health, reflection, capabilities --------------------------------------------------------------

def test_health_answers_for_the_server_and_the_service(prep_address):
    with grpc.insecure_channel(prep_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "nvfp4_prep.v1.Prep"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_contract(prep_address):
    with grpc.insecure_channel(prep_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"nvfp4_prep.v1.Prep", "grpc.health.v1.Health"} <= services
        proto = database.FindFileContainingSymbol("nvfp4_prep.v1.Prep")
        assert proto.package == "nvfp4_prep.v1"
        methods = {m.name: (m.client_streaming, m.server_streaming) for m in proto.service[0].method}
        assert methods == {"Prepare": (True, True), "GetCapabilities": (False, False)}


def test_capabilities_describe_the_server(start_server):
    server = start_server(chunk_size=1 << 20, memory_budget=123 << 20, cache_bytes=5 << 20)
    with PrepClient(server.address) as client:
        caps = client.capabilities()
    assert caps.api == "nvfp4_prep.v1"
    assert caps.torch_version and caps.pipeline_version == layout.PIPELINE_VERSION
    offered = {b.backend: b for b in caps.backends}
    assert set(offered) == set(layout.BACKENDS)
    for backend, capability in offered.items():
        assert layout.layout_id(backend) in capability.layout_versions
        profiles = {p.profile: p for p in capability.profiles}
        assert set(profiles) == set(layout.PROFILES)
        for name, profile in profiles.items():
            assert tuple(profile.activations) == layout.backend_activations(name, backend)
            assert all(layout.layout_id(backend, profile=name, activation=a) in capability.layout_versions
                       for a in profile.activations)
    assert "swigluoai" not in {p.profile: p for p in offered["flashinfer_trtllm"].profiles}["vllm-0.33"].activations
    assert list(caps.activations) == list(layout.ALL_ACTIVATIONS)
    assert [(d.device, d.memory_budget_bytes) for d in caps.devices] == [("cpu", 123 << 20)]
    assert caps.limits.chunk_size == 1 << 20 and caps.limits.cache_bytes == 5 << 20
    assert caps.limits.max_receive_message_bytes > 4 << 20
    # Without --max-request-bytes: what fits beside its outputs in the budget.
    assert caps.limits.max_request_bytes == (123 << 20) // 2
    assert not caps.checkpoint_refs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_servers_started_and_stopped_leave_no_threads_behind(make_layer):
    layer = make_layer()
    before = threading.active_count()
    stopped = []  # kept, as the start_server fixture keeps its servers: their threads must end all the same
    for _ in range(5):
        # Every thread kind: a call (rpc pool, hashing for the cache, the --max-deadline watchdog), health port,
        # metrics.
        server = PrepServer(ServeConfig(host="127.0.0.1", port=0, devices=("cpu",), memory_budget=1 << 30,
                                        cache_bytes=64 << 20, max_deadline=30, metrics_port=free_port(),
                                        health_port=free_port())).start()
        try:
            with PrepClient(server.address, timeout=60) as client:
                client.prepare_layer(layer, BACKEND)
            with grpc.insecure_channel(f"127.0.0.1:{server.health_port.port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert threading.active_count() > before + 4
        finally:
            server.stop(grace=0)
            stopped.append(server)
    wait_for(lambda: threading.active_count() <= before + 2)
