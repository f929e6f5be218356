"""/metrics under attack and under the gRPC port's security, on real listeners on loopback: idle and dripping
connections cannot pile up threads, TLS and bearer tokens protect the page like the gRPC port, the address
is configurable, and refused calls neither flood the log nor echo what the caller sent."""

from __future__ import annotations

import argparse
import gzip
import http.client
import logging
import select
import selectors
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvfp4_prep.server.config import ConfigError, ServeConfig, add_arguments
from nvfp4_prep.server.metrics import Metrics
from nvfp4_prep.server.metrics_http import THREAD_PREFIX, MetricsHttpServer
from nvfp4_prep.server.refusals import RefusalLog
from nvfp4_prep.v1 import prep_pb2 as pb
from tests.helpers.certificates import issue, make_ca
from tests.helpers.server_state import wait_for

TOKEN = "tok-grpc-6b1d9e2f4a7c3058"
SCRAPE_TOKEN = "tok-scrape-2c8e5a1f9d3b7046"
# What a hostile caller puts where a careless server would log it.
SECRET_IN_PATH = "tok-in-the-path-5e9b2d7a1c4f8036"
SECRET_IN_METADATA = "tok-in-metadata-8a3f6c1e9b2d5047"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def metrics_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(THREAD_PREFIX))


def get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    tokens, scrape_tokens = d / "tokens", d / "scrape-tokens"
    tokens.write_text(f"{TOKEN}\n")
    scrape_tokens.write_text(f"{SCRAPE_TOKEN}\n")
    return SimpleNamespace(ca=ca, server=issue(ca, d, "server", server=True),
                           client=issue(ca, d, "scraper", server=False), tokens=tokens, scrape_tokens=scrape_tokens)


@pytest.fixture
def listener():
    """``listener(**MetricsHttpServer options)``: a started /metrics listener on a free loopback port."""
    started: list[MetricsHttpServer] = []

    def start(**options) -> MetricsHttpServer:
        server = MetricsHttpServer(Metrics(devices=("cpu",)).page, "127.0.0.1", 0, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- connections that hold threads ----------------------------------------------------------------------

def test_200_idle_connections_hold_at_most_the_bound_of_threads_and_are_all_closed_after_the_timeout(listener):
    before = metrics_threads()
    server = listener(timeout=2.0, max_handlers=16)
    with selectors.DefaultSelector() as selector:
        idle = []
        for _ in range(200):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
            idle.append(connection)
        peak, open_ = 0, set(idle)
        end = time.monotonic() + 60
        while open_ and time.monotonic() < end:
            peak = max(peak, metrics_threads() - before)
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", "an idle connection got an answer it never asked for"
                selector.unregister(key.fileobj)
                open_.discard(key.fileobj)
        for connection in idle:
            connection.close()
    assert not open_, f"{len(open_)} idle connections still open after 60 s"
    # The accept loop's thread, and at most 16 handlers.
    assert 1 <= peak <= 1 + 16, peak
    assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
    wait_for(lambda: metrics_threads() - before == 1, timeout=30)


def test_a_connection_that_drips_its_request_is_closed_at_its_time(listener):
    # A byte every 0.2 s never lets a 2 s socket timeout fire: only the per-connection time limit ends it.
    server = listener(timeout=2.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        end, closed = time.monotonic() + 30, False
        while not closed and time.monotonic() < end:
            try:
                connection.sendall(b"a")
                readable, _, _ = select.select([connection], [], [], 0.2)
                closed = bool(readable) and connection.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    assert closed, "the dripping connection was still served after 30 s"


def test_stop_ends_open_connections_and_every_thread(listener):
    before = metrics_threads()
    server = listener(timeout=60.0)
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    wait_for(lambda: metrics_threads() - before == 1 + 4, timeout=30)
    server.stop()
    assert metrics_threads() == before
    for connection in connections:
        with connection:
            assert connection.recv(1) == b""


def test_only_the_metrics_path_is_served_and_the_page_has_no_created_series(listener):
    server = listener()
    assert get(f"http://127.0.0.1:{server.port}/secret-{SECRET_IN_PATH}")[0] == 404
    status, text = get(f"http://127.0.0.1:{server.port}/metrics?name[]=x")
    assert status == 200
    names = {name for name, _ in samples(text)}
    assert "nvfp4_prep_build_info" in names
    assert not [name for name in names if name.endswith("_created")]
    # As Prometheus asks for it: gzip, the same page.
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        unzipped = gzip.decompress(response.read()).decode()
    assert {name for name, _ in samples(unzipped)} == names


def test_latency_buckets_reach_the_deadline_ceiling():
    metrics = Metrics()
    metrics.observe_request("Prepare", "flashinfer_cutlass", "DEADLINE_EXCEEDED", ServeConfig().max_deadline - 1)
    bucket = metrics.registry.get_sample_value(
        "nvfp4_prep_request_duration_seconds_bucket",
        {"method": "Prepare", "backend": "flashinfer_cutlass", "le": str(float(ServeConfig().max_deadline))})
    assert bucket == 1


# -- protection like the gRPC port's -------------------------------------------------------------------

def test_metrics_want_the_grpc_token_when_the_server_wants_one(start_server, pki):
    port = free_port()
    server = start_server(metrics_port=port, auth_token_file=pki.tokens)
    url = f"http://127.0.0.1:{port}/metrics"
    status, body = get(url)
    assert status == 401 and "no bearer token" in body
    assert get(url, "tok-wrong-00000000000000")[0] == 401
    status, text = get(url, TOKEN)
    assert status == 200
    page = samples(text)
    assert page["nvfp4_prep_auth_refusals_total", (("listener", "metrics"), ("reason", "no_token"))] == 1
    assert page["nvfp4_prep_auth_refusals_total", (("listener", "metrics"), ("reason", "unknown_token"))] == 1
    assert page["nvfp4_prep_auth_refusals_total", (("listener", "grpc"), ("reason", "no_token"))] == 0
    assert server.metrics_server is not None


def test_a_scrape_token_file_replaces_the_grpc_tokens_on_metrics(start_server, pki):
    port = free_port()
    start_server(metrics_port=port, auth_token_file=pki.tokens, metrics_token_file=pki.scrape_tokens)
    url = f"http://127.0.0.1:{port}/metrics"
    assert get(url, TOKEN)[0] == 401, "a client's gRPC token must not read the metrics"
    assert get(url, SCRAPE_TOKEN)[0] == 200


def test_a_bad_scrape_token_file_stops_the_server_naming_the_flag(start_server, tmp_path):
    short = tmp_path / "short"
    short.write_text("short\n")
    with pytest.raises(ConfigError, match=r"^--metrics-token-file: the token on line 1"):
        start_server(metrics_port=free_port(), metrics_token_file=short)


def tls_context(pki, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if client:
        context.load_cert_chain(pki.client.cert_path, pki.client.key_path)
    return context


def plaintext_is_refused(url: str) -> bool:
    try:
        get(url)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        return True
    return False


def test_metrics_speak_tls_with_the_server_certificate(start_server, pki):
    port = free_port()
    start_server(metrics_port=port, tls_cert=pki.server.cert_path, tls_key=pki.server.key_path)
    status, text = get(f"https://127.0.0.1:{port}/metrics", context=tls_context(pki))
    assert status == 200 and "nvfp4_prep_build_info" in text
    assert plaintext_is_refused(f"http://127.0.0.1:{port}/metrics")


def test_metrics_under_mutual_tls_want_a_client_certificate(start_server, pki):
    port = free_port()
    start_server(metrics_port=port, tls_cert=pki.server.cert_path, tls_key=pki.server.key_path,
                 tls_client_ca=pki.ca.cert_path)
    url = f"https://127.0.0.1:{port}/metrics"
    assert get(url, context=tls_context(pki, client=True))[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(url, context=tls_context(pki))


def test_no_metrics_tls_serves_plain_http_beside_a_tls_grpc_port(start_server, pki):
    port = free_port()
    start_server(metrics_port=port, tls_cert=pki.server.cert_path, tls_key=pki.server.key_path, metrics_tls=False)
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200


def test_metrics_listen_on_the_metrics_address_only(start_server):
    port = free_port()
    start_server(host="127.0.0.1", metrics_address="127.0.0.2", metrics_port=port)
    assert get(f"http://127.0.0.2:{port}/metrics")[0] == 200
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{port}/metrics")


def test_metrics_address_defaults_to_the_host_and_comes_from_the_environment():
    assert ServeConfig().metrics_address is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = ServeConfig.from_args(parser.parse_args([]), {"NVFP4_PREP_METRICS_ADDRESS": "127.0.0.1"})
    assert config.metrics_address == "127.0.0.1"
    with pytest.raises(ConfigError, match="--metrics-address"):
        ServeConfig.from_args(parser.parse_args(["--metrics-address", " "]), {})


# -- refusal logs -----------------------------------------------------------------------------------------

def test_500_refused_calls_log_a_few_lines_without_the_callers_strings(start_server, pki, caplog):
    caplog.set_level(logging.DEBUG)
    server = start_server(auth_token_file=pki.tokens)
    with grpc.insecure_channel(server.address) as channel:
        capabilities = channel.unary_unary("/nvfp4_prep.v1.Prep/GetCapabilities",
                                           request_serializer=pb.GetCapabilitiesRequest.SerializeToString)
        made_up = channel.unary_unary(f"/nvfp4_prep.v1.Prep/{SECRET_IN_PATH}")
        for number in range(500):
            with pytest.raises(grpc.RpcError) as info:
                if number % 2:
                    capabilities(pb.GetCapabilitiesRequest(), timeout=10,
                                 metadata=(("authorization", f"Bearer {SECRET_IN_METADATA}"),))
                else:
                    made_up(b"", timeout=10, metadata=(("x-note", SECRET_IN_METADATA),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused = [r for r in caplog.records if r.name.startswith("nvfp4_prep") and r.levelno >= logging.WARNING]
    # The first refusal, and a line a minute at most after it (a slow machine may cross one minute).
    assert 1 <= len(refused) <= 3, [r.getMessage() for r in refused]
    assert "refused" in refused[0].getMessage() and "127.0.0.1" in refused[0].getMessage()
    for text in [caplog.text, *(str(vars(record)) for record in caplog.records)]:
        for secret in (SECRET_IN_PATH, SECRET_IN_METADATA, "GetCapabilities"):
            assert secret not in text
    counts = server.refusals.counts()
    assert counts["grpc", "no_token"] == 250 and counts["grpc", "unknown_token"] == 250
    value = server.metrics.registry.get_sample_value
    assert value("nvfp4_prep_auth_refusals_total", {"listener": "grpc", "reason": "unknown_token"}) == 250


def test_refusals_after_the_interval_log_one_line_counting_those_in_between(caplog):
    caplog.set_level(logging.WARNING, logger="nvfp4_prep.server.refusals")
    refusals = RefusalLog(interval=0.5)
    for _ in range(10):
        refusals.refused("grpc", "no_token", "ipv4:127.0.0.1:1")
    refusals.refused("metrics", "unknown_token", "127.0.0.1:2")
    time.sleep(0.6)
    refusals.refused("metrics", "no_token", "127.0.0.1:3")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert "grpc/no_token 9" in lines[1] and "metrics/unknown_token 1" in lines[1]
    assert refusals.counts() == {("grpc", "no_token"): 10, ("grpc", "unknown_token"): 0,
                                 ("metrics", "no_token"): 1, ("metrics", "unknown_token"): 1}
    with pytest.raises(ValueError, match="not one of"):
        refusals.refused("grpc", "made up", "127.0.0.1:4")
