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
from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.node import node_id
from nvfp4_prep.server.client_memory import ClientMemory
from nvfp4_prep.server.errors import DeadlinePassed
from nvfp4_prep.server.ipc import IpcWriteLease
from nvfp4_prep.server.worker import DeviceWorker
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import encode_tensors, header_for
from tests.helpers.layer_factory import random_layer

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
    ({"ipc_device_uuid": "GPU-1"}, "header.ipc_device_uuid", "is set without DELIVERY_CUDA_IPC"),
    ({"process_id": "p"}, "header.process_id", "is set without DELIVERY_CUDA_IPC"),
    ({"delivery": pb.DELIVERY_CUDA_IPC, "node_id": "b/h", "ipc_device_uuid": "x" * 65}, "header.ipc_device_uuid",
     "at most 64"),
    ({"delivery": pb.DELIVERY_CUDA_IPC, "node_id": "b/h", "process_id": "x" * 65}, "header.process_id",
     "at most 64"),
    ({"delivery": pb.DELIVERY_CUDA_IPC, "node_id": "b/h", "ipc_destinations": [pb.IpcDestination()]},
     "header.ipc_destinations", "without header.ipc_device_uuid"),
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


@pytest.mark.parametrize(("responses", "field", "words"), [
    ([pb.PrepareResponse(ipc_write=pb.IpcWrite(lease_id="l"))], "response.ipc_write", "lands on cpu"),
    ([pb.PrepareResponse(written=pb.IpcWritten(lease_id="l"))], "response.written", "out of turn"),
])
def test_a_write_out_of_turn_breaks_the_framing(make_layer, responses, field, words):
    """The server asks to write into this process's memory, but the answer lands in pageable host memory; or it
    says it wrote what it never asked to."""
    prepared = pipeline.prepare(make_layer(), BACKEND)
    header = pb.PreparedHeader(tensors=[header_for(n, t) for n, t in prepared.tensors.items()])
    held = HeldRequests(iter(()))
    asked = _header(make_layer(), delivery=pb.DELIVERY_CUDA_IPC, node_id="b/h", ipc_device_uuid="GPU-1")
    with pytest.raises(PrepProtocolError, match=words) as info:
        Answer(asked, None).receive(iter([pb.PrepareResponse(header=header), *responses]), held)
    assert info.value.field == field


def test_a_write_asked_of_a_call_that_named_no_gpu_breaks_the_framing(make_layer):
    prepared = pipeline.prepare(make_layer(), BACKEND)
    header = pb.PreparedHeader(tensors=[header_for(n, t) for n, t in prepared.tensors.items()])
    asked = _header(make_layer(), delivery=pb.DELIVERY_CUDA_IPC, node_id="b/h")
    responses = [pb.PrepareResponse(header=header), pb.PrepareResponse(ipc_write=pb.IpcWrite(lease_id="l"))]
    with pytest.raises(PrepProtocolError, match="named no GPU") as info:
        Answer(asked, None).receive(iter(responses), HeldRequests(iter(())))
    assert info.value.field == "response.ipc_write"


@pytest.mark.parametrize(("shared", "field", "words"), [
    (pb.CudaIpcTensor(storage_size_bytes=4096), "d.storage_handle", "is 0 bytes"),
    (pb.CudaIpcTensor(storage_handle=bytes(300), storage_size_bytes=4096), "d.storage_handle", "is 300 bytes"),
    (pb.CudaIpcTensor(storage_handle=bytes(64), storage_size_bytes=4096, tensor_offset=1000), "d.storage_size_bytes",
     "at least 5096"),
])
def test_client_memory_refuses_a_destination_before_mapping_it(shared, field, words):
    memory = ClientMemory(idle_seconds=30)
    with pytest.raises(PrepError, match=words) as info:
        memory.destination(0, shared, nbytes=1096, itemsize=4, field="d")
    assert info.value.field == field
    assert len(memory) == 0


def _write_lease(seconds: float = 30.0, on_expire=lambda error: None) -> tuple[IpcWriteLease, dict]:
    prepared = pipeline.prepare(random_layer(experts=2, hidden=256, inter=128), BACKEND)
    shapes = {name: (str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in prepared.tensors.items()}
    lease = IpcWriteLease(DeviceWorker(torch.device("cpu"), 1 << 30, 1 << 20), prepared, seconds, on_expire)
    return lease, shapes


def test_a_lease_settled_in_time_never_expires():
    ended = threading.Event()
    lease, shapes = _write_lease(0.2, lambda error: ended.set())
    try:
        lease.named(_named(shapes))  # settles it
        assert not ended.wait(0.6), "the lease timer ended a call whose client did its part"
        assert lease.expired is None
    finally:
        lease.release()


def test_a_lease_that_ran_out_cannot_be_settled_after():
    ended = threading.Event()
    lease, shapes = _write_lease(0.05, lambda error: ended.set())
    assert ended.wait(10)
    with pytest.raises(DeadlinePassed, match=r"--ipc-lease-timeout=0\.05s"):
        lease.named(_named(shapes))


def _named(shapes: dict, **changes) -> list[pb.IpcDestination]:
    """Up-front destinations of ``shapes`` (name to dtype and shape), with ``changes`` (name to (dtype, shape),
    or None to leave the name out)."""
    wanted = {name: value for name, value in {**shapes, **changes}.items() if value is not None}
    return [pb.IpcDestination(tensor=pb.TensorHeader(name=name, dtype=dtype, shape=shape),
                              memory=pb.CudaIpcTensor(storage_handle=bytes(64)))
            for name, (dtype, shape) in wanted.items()]


def test_up_front_destinations_are_put_in_the_answers_order():
    lease, shapes = _write_lease()
    try:
        named = list(reversed(_named(shapes)))
        ordered = lease.named(named)
        assert len(ordered.tensors) == len(shapes) and ordered.lease_id == lease.lease_id
        by_name = {destination.tensor.name: destination.memory for destination in named}
        assert list(ordered.tensors) == [by_name[header.name] for header in lease.header.tensors]
    finally:
        lease.release()


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda shapes: {next(iter(shapes)): None}, "header.ipc_destinations", "has no tensor"),
    (lambda shapes: {"extra": ("uint8", [1])}, "header.ipc_destinations", "names 'extra'"),
    (lambda shapes: {name: ("float32", [3]) for name in list(shapes)[:1]}, "header.ipc_destinations['{first}']",
     "of shape"),
])
def test_up_front_destinations_that_do_not_match_the_answer_are_refused(change, field, words):
    lease, shapes = _write_lease()
    try:
        with pytest.raises(PrepError, match=words) as info:
            lease.named(_named(shapes, **change(shapes)))
        assert info.value.field == field.format(first=next(iter(shapes)))
    finally:
        lease.release()


def test_an_up_front_destination_named_twice_is_refused():
    lease, shapes = _write_lease()
    try:
        named = _named(shapes)
        with pytest.raises(PrepError, match="again") as info:
            lease.named([*named, named[0]])
        assert info.value.field == f"header.ipc_destinations[{len(named)}].tensor.name"
    finally:
        lease.release()


def test_held_requests_stay_open_until_taken_then_end():
    held = HeldRequests(iter(["header", "chunk"]))
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.extend(held))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and seen == ["header", "chunk"]  # still waiting for the layer to be taken
    held.send_last(pb.PrepareRequest(taken=pb.IpcTaken(lease_id="lease-1")))
    reader.join(30)
    assert not reader.is_alive()
    assert seen[2:] == [pb.PrepareRequest(taken=pb.IpcTaken(lease_id="lease-1"))]
    assert len(seen) == 3


def test_held_requests_end_on_close_without_taking():
    held = HeldRequests(iter(["header"]))
    assert next(held) == "header"
    held.close()
    assert list(held) == []
