"""Who gets in: TLS, mutual TLS and bearer tokens on a real server with certificates made here, the
plaintext health port, path escapes through checkpoint references, and credentials kept out of logs."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nvfp4_prep import pipeline
from nvfp4_prep.client import (
    PrepClient,
    PrepInvalidArgument,
    PrepPermissionDenied,
    PrepUnauthenticated,
    PrepUnavailable,
)
from nvfp4_prep.client.credentials import BearerToken
from nvfp4_prep.server.config import ConfigError, ServeConfig
from nvfp4_prep.server.server import PrepServer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from tests.helpers.certificates import issue, make_ca
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_process import ServerProcess

BACKEND = "flashinfer_cutlass"
TOKEN = "tok-3f9a1c7e5b2d4086"
OLD_TOKEN = "tok-old-8d2c4b6a1e3f5079"
WRONG_TOKEN = "tok-wrong-0000000000000"
PREFIX = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA with server and client certificates (and expired ones), a second CA, and a token file."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d), make_ca(d, "other CA")
    tokens = d / "tokens"
    tokens.write_text(f"# rotation: the new token, then the old one\n{TOKEN}\n\n{OLD_TOKEN}\n")
    return SimpleNamespace(
        ca=ca, other_ca=other, tokens=tokens,
        server=issue(ca, d, "server", server=True),
        expired_server=issue(ca, d, "expired server", server=True, expired=True),
        client=issue(ca, d, "loader-7", server=False),
        expired_client=issue(ca, d, "expired client", server=False, expired=True),
        rogue_client=issue(other, d, "rogue", server=False),
    )


@pytest.fixture(scope="module")
def layer():
    return random_layer(2, 256, 128)


def tls(pki, mutual: bool = False, **fields) -> dict:
    fields = {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path, **fields}
    if mutual:
        fields["tls_client_ca"] = pki.ca.cert_path
    return fields


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- TLS ---------------------------------------------------------------------------------------------

def test_tls_client_that_trusts_the_ca_prepares_bit_exactly(start_server, pki, layer, same_tensors):
    server = start_server(**tls(pki))
    with PrepClient(server.address, tls_ca=pki.ca.cert_path) as client:
        assert client.health() == "SERVING"
        result = client.prepare_layer(layer, BACKEND)
    same_tensors(result.tensors, pipeline.prepare(layer, BACKEND).tensors)


@pytest.mark.parametrize("case", ["plaintext client", "wrong CA", "expired server certificate"])
def test_tls_handshakes_that_must_fail(start_server, pki, layer, case):
    certificate = pki.expired_server if case == "expired server certificate" else pki.server
    server = start_server(tls_cert=certificate.cert_path, tls_key=certificate.key_path)
    trust = {"plaintext client": {}, "wrong CA": {"tls_ca": pki.other_ca.cert_path},
             "expired server certificate": {"tls_ca": pki.ca.cert_path}}[case]
    with PrepClient(server.address, retries=0, **trust) as client, pytest.raises(PrepUnavailable):
        client.prepare_layer(layer, BACKEND, timeout=10)
    assert server.service.outcomes == {}, "no call got through"


# -- mutual TLS --------------------------------------------------------------------------------------

def test_mutual_tls_admits_a_client_certificate_of_the_ca(start_server, pki, layer, same_tensors):
    server = start_server(**tls(pki, mutual=True), max_concurrent_per_client=1)
    with PrepClient(server.address, tls_ca=pki.ca.cert_path, tls_cert=pki.client.cert_path,
                    tls_key=pki.client.key_path.read_bytes()) as client:  # a path or PEM bytes
        result = client.prepare_layer(layer, BACKEND)
        same_tensors(result.tensors, pipeline.prepare(layer, BACKEND).tensors)


@pytest.mark.parametrize("case", ["no client certificate", "certificate of another CA", "expired certificate"])
def test_mutual_tls_refuses(start_server, pki, layer, case):
    server = start_server(**tls(pki, mutual=True))
    identity = {"no client certificate": {},
                "certificate of another CA": {"tls_cert": pki.rogue_client.cert_path,
                                              "tls_key": pki.rogue_client.key_path},
                "expired certificate": {"tls_cert": pki.expired_client.cert_path,
                                        "tls_key": pki.expired_client.key_path}}[case]
    with PrepClient(server.address, tls_ca=pki.ca.cert_path, retries=0, **identity) as client:
        with pytest.raises(PrepUnavailable):
            client.capabilities(timeout=10)
        with pytest.raises(PrepUnavailable):
            client.prepare_layer(layer, BACKEND, timeout=10)
    assert server.service.outcomes == {}


# -- bearer tokens -----------------------------------------------------------------------------------

def test_token_missing_or_wrong_is_unauthenticated_and_either_listed_token_works(start_server, pki, layer):
    server = start_server(**tls(pki), auth_token_file=pki.tokens)
    for token in (None, WRONG_TOKEN, TOKEN[:-1], TOKEN + "x"):
        with PrepClient(server.address, tls_ca=pki.ca.cert_path, token=token) as client:
            with pytest.raises(PrepUnauthenticated) as info:
                client.prepare_layer(layer, BACKEND)
            assert "authorization" in info.value.details
            assert token is None or token not in info.value.details
            with pytest.raises(PrepUnauthenticated):
                client.capabilities()
    assert server.service.outcomes == {}, "refused before the service saw the call"
    for token in (TOKEN, OLD_TOKEN):
        with PrepClient(server.address, tls_ca=pki.ca.cert_path, token=token) as client:
            assert client.prepare_layer(layer, BACKEND).layout["backend"] == BACKEND
    assert server.service.outcomes["OK"] == 2


def test_health_is_open_to_probes_only_when_configured(start_server, pki):
    for open_health, want in ((True, "SERVING"), (False, None)):
        server = start_server(auth_token_file=pki.tokens, health_without_auth=open_health)
        with grpc.insecure_channel(server.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            if want:
                assert health_pb2.HealthCheckResponse.ServingStatus.Name(
                    check(health_pb2.HealthCheckRequest(service="nvfp4_prep.v1.Prep"), timeout=10).status) == want
            else:
                with pytest.raises(grpc.RpcError) as info:
                    check(health_pb2.HealthCheckRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Reflection would describe the API: it needs the token either way.
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
            with pytest.raises(grpc.RpcError) as info:
                list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with PrepClient(server.address, token=TOKEN) as client:
            assert client.health() == "SERVING"


def test_health_port_serves_probes_in_plaintext_and_nothing_else(start_server, pki):
    port = free_port()
    server = start_server(**tls(pki, mutual=True), auth_token_file=pki.tokens, health_port=port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for name in ("", "nvfp4_prep.v1.Prep"):
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            prep_pb2_grpc.PrepStub(channel).GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    server.drain(timeout=0)  # the health port follows the server: NOT_SERVING while it drains, then gone
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_credentials_never_appear_in_logs(pki, layer, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    server = ServerProcess("--log-level", "DEBUG", "--tls-cert", str(pki.server.cert_path),
                           "--tls-key", str(pki.server.key_path), "--auth-token-file", str(pki.tokens))
    try:
        for token in (WRONG_TOKEN, TOKEN):
            with PrepClient(server.address, tls_ca=pki.ca.cert_path, token=token, retries=0) as client:
                try:
                    client.prepare_layer(layer, BACKEND)
                except PrepUnauthenticated:
                    pass
        server.wait_for_log(lambda r: r.get("message", "").startswith("Prepare OK"))
        server.wait_for_log(lambda r: "refused" in r.get("message", ""))
    finally:
        server.stop()
    key = pki.server.key_pem.decode()
    secrets = (TOKEN, OLD_TOKEN, WRONG_TOKEN, key.splitlines()[1])
    for text, where in ((server.log, "server log"), (caplog.text, "client log"),
                        (repr(BearerToken(TOKEN)), "repr")):
        for secret in secrets:
            assert secret not in text, f"a credential appears in the {where}"


# -- start-up checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case, fragment", [
    ("key of another certificate", "--tls-cert/--tls-key"),
    ("certificate is not PEM", "--tls-cert"),
    ("client CA is not PEM", "--tls-client-ca"),
    ("token too short", "--auth-token-file"),
    ("no token in the file", "--auth-token-file"),
])
def test_bad_credential_files_stop_the_server_naming_the_flag(pki, tmp_path, case, fragment):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    short, empty = tmp_path / "short", tmp_path / "empty"
    short.write_text("abc\n")
    empty.write_text("# nothing here\n\n")
    fields = {
        "key of another certificate": tls(pki, tls_key=pki.client.key_path),
        "certificate is not PEM": tls(pki, tls_cert=junk),
        "client CA is not PEM": tls(pki, tls_client_ca=junk),
        "token too short": {"auth_token_file": short},
        "no token in the file": {"auth_token_file": empty},
    }[case]
    with pytest.raises(ConfigError) as info:
        PrepServer(ServeConfig(host="127.0.0.1", port=0, devices=("cpu",), memory_budget=1 << 30, **fields))
    assert fragment in str(info.value)
    assert "abc" not in str(info.value)


# -- checkpoint references that try to leave the allowed roots ---------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> SimpleNamespace:
    """An allowed root with a checkpoint, and a checkpoint outside it."""
    root, outside = tmp_path / "models", tmp_path / "private"
    tensors = {**dense_tensors(64), **moe_layer_tensors(0, 2, 64, 64)}
    write_checkpoint(root / "ckpt", tensors)
    write_checkpoint(outside / "secret", tensors)
    (root / "link").symlink_to(outside / "secret", target_is_directory=True)
    sneaky = root / "sneaky"
    write_checkpoint(sneaky, tensors)
    (sneaky / "model.safetensors").unlink()
    (sneaky / "model.safetensors").symlink_to(outside / "secret" / "model.safetensors")
    return SimpleNamespace(root=root, outside=outside)


@pytest.mark.parametrize("location, error", [
    ("{outside}/secret", PrepPermissionDenied),
    ("{root}/ckpt/../../private/secret", PrepPermissionDenied),
    ("file://{root}/../private/secret", PrepPermissionDenied),
    ("{root}/link", PrepPermissionDenied),
    ("{root}/sneaky", PrepPermissionDenied),
    ("file:///etc", PrepPermissionDenied),
    ("models/ckpt", PrepInvalidArgument),
    ("file://attacker.example/models/ckpt", PrepInvalidArgument),
    ("{root}/ckpt\x00/../../private/secret", PrepInvalidArgument),
    ("s3://bucket/ckpt", PrepInvalidArgument),
])
def test_path_escapes_through_references_are_refused(start_server, store, location, error):
    server = start_server(allowed_roots=(store.root,))
    location = location.format(root=store.root, outside=store.outside)
    with PrepClient(server.address) as client:
        with pytest.raises(error) as info:
            client.prepare_reference(location, PREFIX, BACKEND)
        assert info.value.field == "header.ref"
        assert str(store.outside / "secret") not in info.value.details or str(store.outside) in location
        assert client.prepare_reference(str(store.root / "ckpt"), PREFIX, BACKEND).layout["backend"] == BACKEND
