"""Results and errors of Prepare carry the request id the call was sent with, which the server logs too; a
failure the SDK raises is not also logged by it above DEBUG (the caller reports it, once)."""

from __future__ import annotations

import logging
import re
import socket

import pytest

from nvfp4_prep.client import PrepClient, PrepInvalidArgument, PrepUnavailable

REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def _server_ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.request_id for record in caplog.records
            if record.name.startswith("nvfp4_prep.server") and hasattr(record, "request_id")]


def test_a_prepared_layer_carries_the_id_the_server_logged(prep_address, make_layer, caplog) -> None:
    caplog.set_level(logging.INFO)
    with PrepClient(prep_address) as client:
        layer = client.prepare_layer(make_layer(), "flashinfer_cutlass")
    assert REQUEST_ID.fullmatch(layer.request_id)
    assert _server_ids(caplog) == [layer.request_id]


def test_a_failed_prepare_names_its_request_id_once(prep_address, make_layer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    layer = make_layer()
    layer["w2_input_scale"] = -layer["w2_input_scale"]
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, "flashinfer_cutlass")
    error = info.value
    assert REQUEST_ID.fullmatch(error.request_id) and _server_ids(caplog) == [error.request_id]
    assert str(error).startswith("INVALID_ARGUMENT: w2_input_scale") and str(error).endswith(
        f"(request {error.request_id})")
    assert not [record for record in caplog.records
                if record.name.startswith("nvfp4_prep.client") and record.levelno > logging.DEBUG]


def test_calls_other_than_prepare_have_no_request_id() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with PrepClient(f"127.0.0.1:{port}", retry_timeout=0) as client, pytest.raises(PrepUnavailable) as info:
        client.capabilities(timeout=10)
    assert info.value.request_id == "" and "(request" not in str(info.value)
