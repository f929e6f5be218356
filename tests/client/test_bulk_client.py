"""The SDK over the bulk transport against a real server on loopback: bit-exact answers in every landing, TLS
like the channel, the inline fallback when the bulk port cannot be reached, and a client killed mid-transfer
that leaves nothing behind on the server."""

from __future__ import annotations

import argparse
import itertools
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.cli.connection_flags import DEFAULT_BULK_STREAMS, add_security_flags, security_options
from nvfp4_prep.client import PrepClient
from nvfp4_prep.client import bulk as bulk_client
from nvfp4_prep.client.bulk import BulkDialer, target_host
from nvfp4_prep.v1 import prep_pb2 as pb
from tests.helpers.certificates import server_and_client
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutlass"
BULK = {"bulk_address": ("127.0.0.1", 0)}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layer():
    return random_layer(3, 512, 256, seed=7)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return server_and_client(tmp_path_factory.mktemp("bulk-client-pki"))


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def bulk_streams_used(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The bulk streams of every Prepare call the server logged (0: inline)."""
    return [getattr(r, "bulk_streams", 0) for r in caplog.records
            if r.name == "nvfp4_prep.server.service" and getattr(r, "outcome", None) == "OK"]


def fallbacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nvfp4_prep.client.bulk" and "not used" in r.getMessage()]


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("landing", ["host", "cpu", "out"])
def test_stacked_answers_are_bit_exact(start_server, layer, same_tensors, server_log, streams, landing):
    server = start_server(**BULK)
    want = pipeline.prepare(layer, BACKEND).tensors
    where = {"host": {}, "cpu": {"device": "cpu"},
             "out": {"out": {name: torch.empty_like(t) for name, t in want.items()}}}[landing]
    with PrepClient(server.address, bulk_streams=streams, chunk_size=64 << 10) as client:
        got = client.prepare_layer(layer, BACKEND, **where)
    same_tensors(got.tensors, want)
    if landing == "out":
        assert all(got.tensors[name] is where["out"][name] for name in want), "landed in the caller's tensors"
    assert bulk_streams_used(server_log) == [streams]
    wait_for(lambda: idle(server), 30)


@pytest.mark.parametrize("streams", [1, 4])
def test_per_expert_answers_are_bit_exact(start_server, layer, per_expert, same_tensors, server_log, streams):
    server = start_server(**BULK)
    with PrepClient(server.address, bulk_streams=streams, chunk_size=64 << 10) as client:
        got = client.prepare_layer(per_expert(layer), "flashinfer_cutedsl", device="cpu")
    same_tensors(got.tensors, pipeline.prepare(layer, "flashinfer_cutedsl").tensors)
    assert bulk_streams_used(server_log) == [streams]


def test_upload_progress_counts_every_chunk_in_order(start_server, layer, server_log):
    server = start_server(**BULK)
    chunk = 64 << 10
    events = []
    with PrepClient(server.address, bulk_streams=3, chunk_size=chunk) as client:
        client.prepare_layer(layer, BACKEND, progress=events.append)
    sizes = [t.numel() * t.element_size() for t in layer.values()]
    done = [e.done for e in events if e.phase == "upload"]
    steps = [after - before for before, after in itertools.pairwise([0, *done])]
    # One event per chunk, cumulative (the SDK picks the tensors' order: the steps are compared as a multiset).
    assert sorted(steps) == sorted(min(chunk, size - offset) for size in sizes for offset in range(0, size, chunk))
    assert done[-1] == sum(sizes) and {e.total for e in events if e.phase == "upload"} == {sum(sizes)}
    assert bulk_streams_used(server_log) == [3]


def test_a_referenced_layer_comes_down_over_bulk(start_server, modelopt_checkpoint, same_tensors, server_log):
    server = start_server(allowed_roots=(modelopt_checkpoint.parent,), **BULK)
    prefix = "model.layers.1.mlp.experts"
    with PrepClient(server.address) as inline, PrepClient(server.address, bulk_streams=2) as bulk:
        want = inline.prepare_reference(str(modelopt_checkpoint), prefix, BACKEND)
        got = bulk.prepare_reference(str(modelopt_checkpoint), prefix, BACKEND)
    same_tensors(got.tensors, want.tensors)
    assert bulk_streams_used(server_log) == [0, 2]


def test_a_cached_answer_comes_over_bulk(start_server, layer, same_tensors, server_log):
    server = start_server(cache_bytes=64 << 20, **BULK)
    with PrepClient(server.address, bulk_streams=2) as client:
        first = client.prepare_layer(layer, BACKEND)
        second = client.prepare_layer(layer, BACKEND)
    assert not first.cache_hit and second.cache_hit
    same_tensors(second.tensors, pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [2, 2]


# -- TLS ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutual", [False, True])
def test_bulk_over_tls_with_the_channels_certificates(start_server, pki, layer, same_tensors, server_log, mutual):
    fields = {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path, **BULK}
    keys = {"tls_ca": pki.ca.cert_path}
    if mutual:
        fields["tls_client_ca"] = pki.ca.cert_path
        keys.update(tls_cert=pki.client.cert_pem, tls_key=pki.client.key_pem)  # PEM bytes, as the SDK takes them
    server = start_server(**fields)
    with PrepClient(f"localhost:{server.port}", bulk_streams=2, **keys) as client:
        got = client.prepare_layer(layer, BACKEND)
    same_tensors(got.tensors, pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [2]
    assert not fallbacks(server_log)


def test_tls_given_as_grpc_credentials_goes_inline(start_server, pki, layer, same_tensors, server_log):
    server = start_server(tls_cert=pki.server.cert_path, tls_key=pki.server.key_path, **BULK)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)  # opaque: no PEM to reuse
    with PrepClient(f"localhost:{server.port}", bulk_streams=2, credentials=credentials) as client:
        same_tensors(client.prepare_layer(layer, BACKEND).tensors, pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [0]
    assert "grpc credentials" in fallbacks(server_log)[0].getMessage()


# -- fallback -------------------------------------------------------------------------------------------

def test_a_stopped_bulk_listener_falls_back_to_inline_once_logged(start_server, layer, same_tensors, server_log):
    server = start_server(**BULK)
    server.bulk.stop()  # the port is closed now: connections are refused
    with PrepClient(server.address, bulk_streams=2) as client:
        for _ in range(2):
            same_tensors(client.prepare_layer(layer, BACKEND, timeout=60).tensors,
                         pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [0, 0]
    assert len(fallbacks(server_log)) == 1, "logged once per client"
    wait_for(lambda: idle(server), 30)


def test_an_advertised_host_nobody_listens_on_falls_back(start_server, layer, same_tensors, server_log):
    server = start_server(bulk_advertise_host="127.0.0.2", **BULK)  # loopback, but the port is bound on .1 only
    with PrepClient(server.address, bulk_streams=1) as client:
        same_tensors(client.prepare_layer(layer, BACKEND, timeout=60).tensors,
                     pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [0]
    assert len(fallbacks(server_log)) == 1


def test_a_client_that_could_not_connect_asks_for_no_bulk_until_a_while_passed(start_server, monkeypatch):
    monkeypatch.setattr(bulk_client, "UNREACHABLE_SECONDS", 1.0)
    server = start_server(**BULK)
    with PrepClient(server.address, bulk_streams=2) as client:
        offer = client.capabilities().bulk_port
    server.bulk.stop()  # connections are refused from now on
    dialer = BulkDialer(2, server.address, None)
    assert dialer.request() == pb.BulkRequest(streams=2)
    assert dialer.connect(pb.BulkOffer(ticket=bytes(32), port=offer, streams=2)) is None
    assert dialer.request() is None  # its calls go inline at once, without waiting for the port again
    wait_for(lambda: dialer.request() is not None, 30)


def test_a_call_whose_offer_never_came_goes_inline_and_the_next_asks_for_no_bulk(monkeypatch):
    monkeypatch.setattr(bulk_client, "OFFER_TIMEOUT", 0.1)  # a server that ignores header.bulk sends no offer
    monkeypatch.setattr(bulk_client, "UNREACHABLE_SECONDS", 30.0)
    dialer = BulkDialer(2, "127.0.0.1:1", None)
    attempt = bulk_client.BulkAttempt(dialer)
    piece = (0, 0, memoryview(b"abcd"))
    sent = list(attempt.requests("header", iter([piece])))
    assert sent[0] == "header" and len(sent) == 2 and not attempt.active  # the piece went inline, encoded
    assert dialer.request() is None


def test_a_server_without_bulk_answers_inline(start_server, layer, same_tensors, server_log):
    server = start_server()
    with PrepClient(server.address, bulk_streams=4) as client:
        assert client.capabilities().bulk_port == 0
        same_tensors(client.prepare_layer(layer, BACKEND).tensors, pipeline.prepare(layer, BACKEND).tensors)
    assert bulk_streams_used(server_log) == [0]
    assert "no bulk port" in fallbacks(server_log)[0].getMessage()


# -- a client that dies ---------------------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import sys, threading
    from nvfp4_prep.client import PrepClient
    from tests.helpers.layer_factory import random_layer

    layer = random_layer(8, 1024, 512)
    def stall(progress):
        if progress.phase == "upload" and progress.done > progress.total // 3:
            print("midway", flush=True)
            threading.Event().wait()  # stuck mid-upload until killed
    with PrepClient(sys.argv[1], bulk_streams=2, chunk_size=64 << 10) as client:
        client.prepare_layer(layer, "flashinfer_cutlass", progress=stall)
""")


def test_a_client_killed_mid_upload_frees_everything(start_server):
    server = start_server(**BULK)
    process = subprocess.Popen([sys.executable, "-c", CLIENT, server.address], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "midway"
        wait_for(lambda: server.workers[0].budget.in_use > 0, 60)
        assert len(server.bulk.book) == 1
    finally:
        process.kill()
        process.wait(30)
    wait_for(lambda: idle(server), 60)
    assert server.service.outcomes.get("OK", 0) == 0


# -- options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("streams", [-1, 9, 2.5])
def test_bulk_streams_out_of_range_are_refused(streams):
    with pytest.raises(ValueError, match="bulk_streams"):
        PrepClient("127.0.0.1:1", bulk_streams=streams)


@pytest.mark.parametrize(("target", "host"), [
    ("127.0.0.1:50051", "127.0.0.1"), ("localhost:50051", "localhost"), ("dns:///nvfp4-prep:50051", "nvfp4-prep"),
    ("dns://10.0.0.10/svc.ns:50051", "svc.ns"), ("ipv4:10.0.0.1:50051", "10.0.0.1"), ("[::1]:50051", "::1"),
    ("ipv6:[::1]:50051", "::1"), ("ipv4:10.0.0.1:50051,10.0.0.2:50051", None), ("unix:/run/prep.sock", None),
])
def test_the_host_a_bulk_connection_dials(target, host):
    assert target_host(target) == host


def test_the_cli_flag_reaches_the_client(monkeypatch):
    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    assert security_options(parser.parse_args(["--bulk-streams", "4"]))["bulk_streams"] == 4
    assert security_options(parser.parse_args([]))["bulk_streams"] == DEFAULT_BULK_STREAMS == 4
    assert security_options(parser.parse_args(["--bulk-streams", "0"]))["bulk_streams"] == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--bulk-streams", "9"])
    monkeypatch.setenv("NVFP4_PREP_BULK_STREAMS", "2")
    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    assert security_options(parser.parse_args([]))["bulk_streams"] == 2
