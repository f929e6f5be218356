"""Limits with clear errors, the deadline ceiling, keepalive and connection age, and the SDK's retry policy,
on a real server on loopback."""

from __future__ import annotations

import argparse
import threading
import time

import grpc
import pytest

from nvfp4_prep.client import (
    PrepClient,
    PrepInvalidArgument,
    PrepResourceExhausted,
)
from nvfp4_prep.client.credentials import channel_credentials
from nvfp4_prep.client.errors import retryable
from nvfp4_prep.client.targets import KEEPALIVE_TIME_MS
from nvfp4_prep.server.config import ConfigError, ServeConfig, add_arguments
from nvfp4_prep.server.limits import ConcurrencyGate
from nvfp4_prep.server.transport import channel_options
from tests.helpers.certificates import issue, make_ca
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint
from tests.helpers.fault_proxy import CuttingProxy
from tests.helpers.held_call import BACKEND, HeldCall
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for


@pytest.fixture(scope="module")
def layer():
    return random_layer(2, 256, 128)


def layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.values())




# -- what one call may announce ----------------------------------------------------------------------

@pytest.mark.parametrize("limit, value, code, fragment", [
    ("max_tensors", 7, grpc.StatusCode.INVALID_ARGUMENT, "announces 8 tensors"),
    ("max_tensor_rank", 2, grpc.StatusCode.INVALID_ARGUMENT, "has rank 3"),
    ("max_tensor_bytes", 4096, grpc.StatusCode.RESOURCE_EXHAUSTED, "(w13_weight).byte_length: is 65536 bytes"),
    ("max_request_bytes", "total - 1", grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes in all"),
])
def test_over_limit_requests_fail_before_any_chunk_is_sent(start_server, layer, limit, value, code, fragment):
    value = layer_bytes(layer) - 1 if value == "total - 1" else value
    server = start_server(**{limit: value})
    with grpc.insecure_channel(server.address) as channel:
        held = HeldCall(channel, layer)  # sends the header only, until released
        assert held.finished.wait(10), "the server answered without waiting for the chunks"
        assert held.error.code() == code
        details = held.error.details()
        assert fragment in details and f"--{limit.replace('_', '-')}={value}" in details, details
        assert dict(held.error.trailing_metadata())["nvfp4-prep-field"] == limit
        held.release()
    with PrepClient(server.address) as client:
        error = PrepInvalidArgument if code == grpc.StatusCode.INVALID_ARGUMENT else PrepResourceExhausted
        with pytest.raises(error) as info:
            client.prepare_layer(layer, BACKEND)
        assert info.value.field == limit
    wait_for(lambda: idle(server))
    assert server.service.outcomes[code.name] == 2


REF_PREFIX = "model.layers.0.mlp.experts"


@pytest.fixture
def checkpoint_root(tmp_path):
    """An allowed root holding checkpoint 'ckpt' with one MoE layer (2 experts, H=I=64)."""
    write_checkpoint(tmp_path / "ckpt", {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64)})
    return tmp_path


def layers_read(server) -> float:
    return server.metrics.registry.get_sample_value(
        "nvfp4_prep_stage_duration_seconds_count", {"stage": "read", "backend": BACKEND}) or 0


@pytest.mark.parametrize("limit, value, fragment", [
    ("memory_budget", 1024, "more than its memory budget of 1024 bytes"),
    ("max_tensor_bytes", 1024, "header.ref[0] (0.gate_proj.weight).byte_length: is 2048 bytes"),
    ("max_request_bytes", 1024, "header.ref: announces"),
])
def test_checkpoint_references_are_limited_before_the_layer_is_read(start_server, checkpoint_root, limit, value,
                                                                     fragment):
    server = start_server(allowed_roots=(checkpoint_root,), **{limit: value})
    with PrepClient(server.address) as client, pytest.raises(PrepResourceExhausted) as info:
        client.prepare_reference(str(checkpoint_root / "ckpt"), REF_PREFIX, BACKEND)
    assert info.value.field == limit and fragment in info.value.details, info.value.details
    assert layers_read(server) == 0
    wait_for(lambda: idle(server))


def test_checkpoint_reference_within_the_limits_is_read_once(start_server, checkpoint_root):
    server = start_server(allowed_roots=(checkpoint_root,), max_tensor_bytes=1 << 20)
    with PrepClient(server.address) as client:
        client.prepare_reference(str(checkpoint_root / "ckpt"), REF_PREFIX, BACKEND)
    assert layers_read(server) == 1 and server.service.outcomes["OK"] == 1
    wait_for(lambda: idle(server))


def test_capabilities_announce_the_limits(start_server):
    server = start_server(max_tensors=100, max_tensor_rank=3, max_tensor_bytes=1 << 20, max_request_bytes=1 << 24,
                          max_concurrent=5, max_concurrent_per_client=2, max_deadline=30)
    with PrepClient(server.address) as client:
        limits = client.capabilities().limits
    assert (limits.max_tensors, limits.max_tensor_rank, limits.max_tensor_bytes, limits.max_request_bytes,
            limits.max_concurrent, limits.max_concurrent_per_client, limits.max_deadline_seconds) == \
        (100, 3, 1 << 20, 1 << 24, 5, 2, 30.0)


# -- how many calls run at once ----------------------------------------------------------------------

def test_total_concurrency_refuses_then_the_sdk_retries_into_a_free_slot(start_server, layer):
    server = start_server(max_concurrent=2)
    with grpc.insecure_channel(server.address) as channel:
        held = [HeldCall(channel, layer) for _ in range(2)]
        wait_for(lambda: server.service.gate.in_flight == 2)
        with PrepClient(server.address, retries=0) as client, pytest.raises(PrepResourceExhausted) as info:
            client.prepare_layer(layer, BACKEND)
        assert info.value.field == "max_concurrent" and "--max-concurrent=2" in info.value.details
        threading.Timer(0.3, held[0].release).start()
        with PrepClient(server.address, retries=6, backoff=0.1) as client:  # refused, then admitted on a retry
            assert client.prepare_layer(layer, BACKEND).layout["backend"] == BACKEND
        held[1].release()
    wait_for(lambda: idle(server))
    assert server.service.outcomes["RESOURCE_EXHAUSTED"] >= 2 and server.service.outcomes["OK"] == 3


def test_per_client_concurrency_tells_clients_apart_by_certificate(start_server, layer, tmp_path):
    ca = make_ca(tmp_path)
    server_cert = issue(ca, tmp_path, "server", server=True)
    loaders = [issue(ca, tmp_path, f"loader-{i}", server=False) for i in range(2)]
    server = start_server(tls_cert=server_cert.cert_path, tls_key=server_cert.key_path, tls_client_ca=ca.cert_path,
                          max_concurrent_per_client=1)
    identity = [{"tls_ca": ca.cert_path, "tls_cert": c.cert_path, "tls_key": c.key_path} for c in loaders]
    with grpc.secure_channel(server.address, channel_credentials(**identity[0])) as channel:
        held = HeldCall(channel, layer)
        wait_for(lambda: server.service.gate.in_flight == 1)
        assert server.service.gate.by_client == {"cert:loader-0": 1}
        with PrepClient(server.address, retries=0, **identity[0]) as same, pytest.raises(PrepResourceExhausted) as e:
            same.prepare_layer(layer, BACKEND)
        assert e.value.field == "max_concurrent_per_client" and "(cert:loader-0)" in e.value.details
        with PrepClient(server.address, retries=0, **identity[1]) as other:
            assert other.prepare_layer(layer, BACKEND).layout["backend"] == BACKEND
        held.release()
    wait_for(lambda: idle(server))


# -- the deadline ceiling ----------------------------------------------------------------------------

def test_deadline_ceiling_stops_a_slow_upload_naming_the_limit(start_server, layer):
    server = start_server(max_deadline=1)
    with grpc.insecure_channel(server.address) as channel:
        held = HeldCall(channel, layer, pace=0.1, chunk_size=4 << 10)  # about 3 s of chunks: past the ceiling
        assert held.finished.wait(10)
    assert held.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--max-deadline=1s" in held.error.details()
    wait_for(lambda: idle(server))


def test_deadline_ceiling_cancels_a_client_that_stalls(start_server, layer):
    server = start_server(max_deadline=1)
    with grpc.insecure_channel(server.address) as channel:
        held = HeldCall(channel, layer)  # sends the header, then nothing
        wait_for(lambda: server.workers[0].budget.in_use > 0)
        started = time.monotonic()
        assert held.finished.wait(10)
        assert held.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--max-deadline=1s" in held.error.details()
        assert time.monotonic() - started < 5
        wait_for(lambda: idle(server))
        held.release_event.set()


# -- keepalive and connection age --------------------------------------------------------------------

def test_sdk_keepalive_stays_within_what_the_server_permits():
    defaults = dict(channel_options(ServeConfig()))
    assert KEEPALIVE_TIME_MS >= defaults["grpc.http2.min_ping_interval_without_data_ms"]
    assert defaults["grpc.keepalive_permit_without_calls"] == 1  # the SDK pings between calls too
    assert defaults["grpc.max_connection_age_grace_ms"] == ServeConfig().max_deadline * 1000


@pytest.mark.parametrize("permit, survives", [(0.5, True), (30, False)])
def test_pings_within_the_permit_keep_an_idle_call_alive(start_server, layer, permit, survives):
    """A call that sends nothing for 6 s while its client pings as often as gRPC lets it (once a second):
    fine when the server permits that, cut with too_many_pings when it does not (what the SDK's defaults
    avoid)."""
    server = start_server(keepalive_permit_time=permit)
    pinging = [("grpc.keepalive_time_ms", 500), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with grpc.insecure_channel(server.address, options=pinging) as channel:
        held = HeldCall(channel, layer)
        time.sleep(6)
        held.release()
    if survives:
        assert held.error is None
    else:
        assert held.error.code() == grpc.StatusCode.UNAVAILABLE and "too many pings" in held.error.details().lower()


def test_connection_age_makes_clients_reconnect_without_failing_calls(start_server, layer):
    server = start_server(max_connection_age=0.5)
    proxy = CuttingProxy(server.port, cut_after=None)  # counts the client's connections
    try:
        with PrepClient(proxy.address) as client:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                assert client.prepare_layer(layer, BACKEND).layout["backend"] == BACKEND
        assert proxy.connections >= 3
    finally:
        proxy.close()
    assert server.service.outcomes.keys() == {"OK"}


# -- what the SDK retries ----------------------------------------------------------------------------

def test_the_sdk_retries_what_the_concurrency_gate_refuses():
    total, per_client = ConcurrencyGate(1, 0), ConcurrencyGate(2, 1)
    assert total.enter("a") is None and per_client.enter("b") is None
    refusals = [total.enter("a"), per_client.enter("b")]
    assert [refusal.field for refusal in refusals] == ["max_concurrent", "max_concurrent_per_client"]
    for refusal in refusals:
        assert retryable(PrepResourceExhausted(refusal.message, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.field))


def test_permanent_errors_are_sent_once(start_server, layer):
    server = start_server(max_tensors=3)
    with PrepClient(server.address, retries=4) as client, pytest.raises(PrepInvalidArgument):
        client.prepare_layer(layer, BACKEND)
    bad = dict(layer, w2_input_scale=-layer["w2_input_scale"])
    server2 = start_server()
    with PrepClient(server2.address, retries=4) as client, pytest.raises(PrepInvalidArgument):
        client.prepare_layer(bad, BACKEND)
    assert server.service.outcomes == {"INVALID_ARGUMENT": 1}
    assert server2.service.outcomes == {"INVALID_ARGUMENT": 1}


# -- the flags ---------------------------------------------------------------------------------------

def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ServeConfig.from_args(parser.parse_args(argv), environ or {})


def test_limit_and_security_flags_come_from_flags_or_the_environment(tmp_path):
    cert = tmp_path / "tls.crt"
    cert.write_text("x")
    flags = ["--max-request-bytes", "1GiB", "--max-tensors", "64", "--max-tensor-rank", "3",
             "--max-tensor-bytes", "256MiB", "--max-concurrent", "8", "--max-concurrent-per-client", "2",
             "--max-deadline", "90", "--keepalive-time", "30", "--keepalive-timeout", "5",
             "--keepalive-permit-time", "10", "--max-connection-age", "0", "--health-port", "50052",
             "--no-health-without-auth", "--tls-cert", str(cert), "--tls-key", str(cert)]
    environ = {"NVFP4_PREP_MAX_REQUEST_BYTES": "1GiB", "NVFP4_PREP_MAX_TENSORS": "64",
               "NVFP4_PREP_MAX_TENSOR_RANK": "3", "NVFP4_PREP_MAX_TENSOR_BYTES": "256MiB",
               "NVFP4_PREP_MAX_CONCURRENT": "8", "NVFP4_PREP_MAX_CONCURRENT_PER_CLIENT": "2",
               "NVFP4_PREP_MAX_DEADLINE": "90", "NVFP4_PREP_KEEPALIVE_TIME": "30",
               "NVFP4_PREP_KEEPALIVE_TIMEOUT": "5", "NVFP4_PREP_KEEPALIVE_PERMIT_TIME": "10",
               "NVFP4_PREP_MAX_CONNECTION_AGE": "0", "NVFP4_PREP_HEALTH_PORT": "50052",
               "NVFP4_PREP_HEALTH_WITHOUT_AUTH": "false", "NVFP4_PREP_TLS_CERT": str(cert),
               "NVFP4_PREP_TLS_KEY": str(cert)}
    want = ServeConfig(max_request_bytes=1 << 30, max_tensors=64, max_tensor_rank=3, max_tensor_bytes=256 << 20,
                       max_concurrent=8, max_concurrent_per_client=2, max_deadline=90.0, keepalive_time=30.0,
                       keepalive_timeout=5.0, keepalive_permit_time=10.0, max_connection_age=0.0,
                       health_port=50052, health_without_auth=False, tls_cert=cert, tls_key=cert)
    assert parse(flags) == want
    assert parse([], environ) == want
    assert "grpc.max_connection_age_ms" not in dict(channel_options(want))
    with pytest.raises(ConfigError, match="NVFP4_PREP_HEALTH_WITHOUT_AUTH"):
        parse([], {"NVFP4_PREP_HEALTH_WITHOUT_AUTH": "maybe"})


@pytest.mark.parametrize("argv, fragment", [
    (["--max-tensor-rank", "9"], "--max-tensor-rank: '9'"),
    (["--max-concurrent", "0"], "--max-concurrent: '0'"),
    (["--max-concurrent-per-client", "-1"], "--max-concurrent-per-client"),
    (["--max-deadline", "0"], "--max-deadline: '0'"),
    (["--max-tensor-bytes", "lots"], "--max-tensor-bytes: 'lots'"),
    (["--keepalive-time", "-5"], "--keepalive-time"),
    (["--tls-cert", "/no/such.crt", "--tls-key", "/no/such.key"], "--tls-cert: '/no/such.crt'"),
    (["--tls-key", __file__], "--tls-cert and --tls-key"),
    (["--tls-client-ca", __file__], "--tls-client-ca: needs --tls-cert"),
    (["--auth-token-file", "/no/such/tokens"], "--auth-token-file"),
    (["--health-port", "50051"], "--health-port: 50051"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse(argv)
    assert fragment in str(info.value)
