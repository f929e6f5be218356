"""The SDK's retries against real servers: a server killed and restarted mid-call, no server at all, a
per-call deadline, and failures that retrying cannot mend (a bad input, a refused TLS handshake)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.cli.connection_flags import security_options
from nvfp4_prep.cli.main import build_parser, main
from nvfp4_prep.client import (
    PrepClient,
    PrepDeadlineExceeded,
    PrepHandshakeFailed,
    PrepInvalidArgument,
    PrepUnavailable,
    Progress,
)
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_process import ServerProcess

BACKEND = "flashinfer_cutlass"
SDK_LOGGER = "nvfp4_prep.client"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(SDK_LOGGER) and "retrying in" in r.getMessage()]


def test_a_call_survives_its_server_killed_and_restarted_on_the_same_port(caplog, same_tensors):
    caplog.set_level(logging.INFO, logger=SDK_LOGGER)
    layer = random_layer(16, 2048, 1024, seed=5)  # a ~50 MB answer: far more than gRPC has in flight at once
    flags = ("--chunk-size", "64KiB")
    servers = [ServerProcess(*flags)]
    port = servers[0].port

    def restart() -> None:
        time.sleep(3)  # down for 3 s plus the new process's start
        servers.append(ServerProcess(*flags, "--port", str(port)))

    restarter = threading.Thread(target=restart)

    def progress(event: Progress) -> None:
        if event.phase == "download" and not restarter.is_alive() and len(servers) == 1:
            servers[0].kill()  # SIGKILL while the answer streams; returns once the process is gone
            restarter.start()

    try:
        with PrepClient(f"127.0.0.1:{port}") as client:  # the default retry timeout
            got = client.prepare_layer(layer, BACKEND, progress=progress, timeout=300)
    finally:
        if restarter.ident is not None:  # started
            restarter.join(180)
        for server in servers:
            server.kill()
    assert len(servers) == 2, "the first server was killed and a second one answered"
    same_tensors(got.tensors, pipeline.prepare(layer, BACKEND).tensors)
    lines = retry_lines(caplog)
    assert lines and all(r.levelno == logging.INFO for r in lines)
    assert any("resuming at tensor" in r.getMessage() for r in caplog.records), "it resumed, not restarted"


def test_with_no_server_the_sdk_gives_up_after_its_retry_timeout(caplog, make_layer):
    caplog.set_level(logging.INFO, logger=SDK_LOGGER)
    started = time.monotonic()
    with PrepClient(f"127.0.0.1:{free_port()}", retry_timeout=2) as client, pytest.raises(PrepUnavailable) as info:
        client.prepare_layer(make_layer(), BACKEND)
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 30, elapsed
    assert type(info.value) is PrepUnavailable and "gave up after" in info.value.details
    assert len(retry_lines(caplog)) >= 2


def test_the_per_call_deadline_bounds_the_retries(make_layer):
    started = time.monotonic()
    with PrepClient(f"127.0.0.1:{free_port()}", timeout=1.5) as client, \
            pytest.raises(PrepDeadlineExceeded) as info:  # the retry timeout (60 s) is longer
        client.capabilities()
    assert time.monotonic() - started < 30
    assert "UNAVAILABLE" in info.value.details


def test_retries_zero_and_retry_timeout_zero_send_once(caplog):
    caplog.set_level(logging.INFO, logger=SDK_LOGGER)
    for options in ({"retries": 0}, {"retry_timeout": 0}):
        with PrepClient(f"127.0.0.1:{free_port()}", **options) as client, pytest.raises(PrepUnavailable) as info:
            client.capabilities()
        assert "gave up after" not in info.value.details
    assert retry_lines(caplog) == []


@pytest.mark.parametrize("options", [{"retry_timeout": -1}, {"retry_timeout": float("nan")}, {"retries": -1},
                                     {"max_backoff": float("inf")}])
def test_retry_settings_out_of_range_are_refused_by_name(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        PrepClient("127.0.0.1:1", **options)


def test_an_invalid_argument_is_not_retried(prep_address, make_layer, caplog):
    caplog.set_level(logging.INFO, logger=SDK_LOGGER)
    layer = make_layer()
    layer["w2_input_scale"] = -layer["w2_input_scale"]
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, BACKEND)
    assert info.value.field.startswith("w2_input_scale")
    assert retry_lines(caplog) == []


@pytest.mark.parametrize("command", [["info"], ["layer", "in.safetensors", "out.safetensors", "--backend", BACKEND],
                                     ["prepare", "ckpt", "--out", "out"]])
def test_the_cli_flag_and_its_variable_reach_the_sdk(command, monkeypatch):
    argv = [*command, "--server", "127.0.0.1:1"]
    assert security_options(build_parser().parse_args(argv))["retry_timeout"] == 60
    assert security_options(build_parser().parse_args([*argv, "--retry-timeout", "7.5"]))["retry_timeout"] == 7.5
    monkeypatch.setenv("NVFP4_PREP_RETRY_TIMEOUT", "3")
    assert security_options(build_parser().parse_args(argv))["retry_timeout"] == 3


def test_the_cli_retry_timeout_bounds_a_prepare_against_no_server(capsys, tmp_path, ct_checkpoint):
    started = time.monotonic()
    assert main(["prepare", str(ct_checkpoint), "--out", str(tmp_path / "out"), "--server",
                 f"127.0.0.1:{free_port()}", "--retry-timeout", "1", "--quiet"]) == 2
    assert time.monotonic() - started < 30
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_the_cli_refuses_a_negative_retry_timeout(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--server", "127.0.0.1:1", "--retry-timeout", "-3"])
    assert "--retry-timeout" in capsys.readouterr().err


# -- a refused TLS handshake: a hint, and no retrying for the whole retry timeout -----------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers.certificates import issue, make_ca

    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d), make_ca(d, "other CA")
    return {"ca": ca, "other": other, "server": issue(ca, d, "server", server=True),
            "rogue": issue(other, d, "rogue", server=False)}


@pytest.mark.parametrize("case", ["mTLS without a client certificate", "mTLS with another CA's certificate",
                                  "wrong CA", "TLS client, plaintext server", "plaintext client, TLS server"])
def test_a_refused_handshake_says_what_to_check_and_is_not_retried_for_long(start_server, pki, caplog, case):
    caplog.set_level(logging.INFO, logger=SDK_LOGGER)
    server_tls = {"tls_cert": pki["server"].cert_path, "tls_key": pki["server"].key_path}
    server = start_server(**{
        "mTLS without a client certificate": {**server_tls, "tls_client_ca": pki["ca"].cert_path},
        "mTLS with another CA's certificate": {**server_tls, "tls_client_ca": pki["ca"].cert_path},
        "wrong CA": server_tls, "TLS client, plaintext server": {}, "plaintext client, TLS server": server_tls,
    }[case])
    client_tls = {
        "mTLS without a client certificate": {"tls_ca": pki["ca"].cert_path},
        "mTLS with another CA's certificate": {"tls_ca": pki["ca"].cert_path, "tls_cert": pki["rogue"].cert_path,
                                               "tls_key": pki["rogue"].key_path},
        "wrong CA": {"tls_ca": pki["other"].cert_path}, "TLS client, plaintext server": {"tls_ca": pki["ca"].cert_path},
        "plaintext client, TLS server": {},
    }[case]
    started = time.monotonic()
    with PrepClient(server.address, **client_tls) as client, pytest.raises(PrepHandshakeFailed) as info:
        client.capabilities()  # the default retry timeout: 60 s
    assert time.monotonic() - started < 30
    assert "--tls-ca" in str(info.value)
    if client_tls:
        assert "client certificate" in str(info.value) and "--tls-cert" in str(info.value)
    assert len(retry_lines(caplog)) <= 1
    assert server.service.outcomes == {}, "no call got through"
