"""Asking for CUDA IPC delivery where the server cannot give it: the answer streams, bit-exact, and the log says why;
bad delivery fields are refused naming them. (The hand-over itself needs a GPU: tests/server/test_cuda_ipc.py.)"""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient, PrepInvalidArgument, PrepProtocolError
from nvfp4_prep.client.ipc import HeldRequests
from nvfp4_prep.client.receiver import Answer
from nvfp4_prep.client.sdk import header_options
from nvfp4_prep.contract.node import node_id
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import encode_tensors, header_for

BACKEND = "flashinfer_cutlass"


def _header(layer: dict[str, torch.Tensor], **fields) -> pb.PrepareHeader:
    return pb.PrepareHeader(backend=BACKEND, activation="swiglu", input_scale_policy="max", **header_options(),
                            tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                                 tensors=[header_for(n, t) for n, t in layer.items()]), **fields)


def _served_log(caplog) -> logging.LogRecord:
    return next(r for r in caplog.records if r.name == "nvfp4_prep.server.service" and hasattr(r, "outcome"))


@pytest.mark.parametrize(("node", "why"), [(None, "prepared on cpu"), ("0-other-boot/otherhost", "another node")])
def test_cuda_ipc_asked_of_a_cpu_server_streams_bit_exact(start_server, raw_stub, make_layer, same_tensors, caplog,
                                                          node, why):
    # A long idle timeout: a server that waited for the end of the request stream (which stays open for
    # PrepareRequest.taken) would fail the call with DEADLINE_EXCEEDED only after it.
    server = start_server(idle_timeout=120)
    layer = make_layer(experts=3)
    header = _header(layer, delivery=pb.DELIVERY_CUDA_IPC, node_id=node or node_id())
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, 4096))]))
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    try:
        got = Answer(header, None).receive(raw_stub(server.address).Prepare(held, timeout=60))
    finally:
        held.close()
    same_tensors(got.tensors, pipeline.prepare(layer, BACKEND).tensors)
    record = _served_log(caplog)
    assert record.outcome == "OK"
    assert record.delivery.startswith("stream (") and why in record.delivery


def test_ipc_lease_timeout_zero_turns_cuda_ipc_off(start_server, raw_stub, make_layer, caplog):
    server = start_server(ipc_lease_timeout=0)
    layer = make_layer()
    header = _header(layer, delivery=pb.DELIVERY_CUDA_IPC, node_id=node_id())
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, 4096))]))
    caplog.set_level(logging.INFO, logger="nvfp4_prep.server")
    try:
        Answer(header, None).receive(raw_stub(server.address).Prepare(held, timeout=60))
    finally:
        held.close()
    assert "--ipc-lease-timeout 0" in _served_log(caplog).delivery


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"delivery": 7}, "header.delivery", "DELIVERY_STREAM (0) or DELIVERY_CUDA_IPC (1)"),
    ({"delivery": pb.DELIVERY_CUDA_IPC}, "header.node_id", "is empty with DELIVERY_CUDA_IPC"),
    ({"node_id": "boot/host"}, "header.node_id", "is set without DELIVERY_CUDA_IPC"),
    ({"delivery": pb.DELIVERY_CUDA_IPC, "node_id": "x" * 513}, "header.node_id", "at most 512"),
])
def test_bad_delivery_fields_are_refused_naming_them(prep_address, raw_stub, make_layer, fields, field, words):
    layer = make_layer()
    requests = [pb.PrepareRequest(header=_header(layer, **fields)),
                *(pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, 4096))]
    with pytest.raises(grpc.RpcError) as info:
        list(raw_stub(prep_address).Prepare(iter(requests), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["nvfp4-prep-field"] == field
    assert words in info.value.details()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_sdk_refuses_cuda_ipc_without_cuda(prep_address, make_layer):
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument, match="CUDA is not available") as info:
        client.prepare_layer(make_layer(), BACKEND, delivery="cuda_ipc")
    assert info.value.field == "delivery"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks a host with CUDA")
def test_sdk_refuses_cuda_ipc_without_a_gpu_to_land_on(prep_address, make_layer):
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument, match="device=None") as info:
        client.prepare_reference("/nowhere", "model.layers.0.mlp.experts", BACKEND, delivery="cuda_ipc")
    assert info.value.field == "delivery"


def test_sdk_refuses_an_unknown_delivery(prep_address, make_layer):
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument, match="'pigeon'") as info:
        client.prepare_layer(make_layer(), BACKEND, delivery="pigeon")
    assert info.value.field == "delivery"


def test_handles_the_client_did_not_ask_for_break_the_framing(make_layer):
    prepared = pipeline.prepare(make_layer(), BACKEND)
    header = pb.PreparedHeader(tensors=[header_for(n, t) for n, t in prepared.tensors.items()])
    responses = iter([pb.PrepareResponse(header=header), pb.PrepareResponse(ipc=pb.IpcLayer(lease_id="l"))])
    with pytest.raises(PrepProtocolError, match="did not ask for CUDA IPC") as info:
        Answer(_header(make_layer()), None).receive(responses)
    assert info.value.field == "response.ipc"


def test_held_requests_stay_open_until_taken_then_end():
    held = HeldRequests(iter(["header", "chunk"]))
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.extend(held))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and seen == ["header", "chunk"]  # still waiting for the layer to be taken
    held.take("lease-1")
    reader.join(30)
    assert not reader.is_alive()
    assert seen[2:] == [pb.PrepareRequest(taken=pb.IpcTaken(lease_id="lease-1"))]
    assert len(seen) == 3


def test_held_requests_end_on_close_without_taking():
    held = HeldRequests(iter(["header"]))
    assert next(held) == "header"
    held.close()
    assert list(held) == []
