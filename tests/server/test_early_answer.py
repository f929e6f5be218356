"""A streamed stacked layer is answered while it still arrives: the header and the first prepared experts come
back before the request's last chunk is sent, the bytes equal ``pipeline.prepare``'s, and a request that turns
bad (or a client that goes away) after the answer began ends the call and leaves the server idle."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient
from nvfp4_prep.client.sdk import upload_order
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import HostTensors, TensorReceiver, encode_tensors, header_for, read_headers
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutedsl"
CHUNK = 64 << 10
WAIT = 30


def _header(layer: dict[str, torch.Tensor], backend: str = BACKEND) -> pb.PrepareRequest:
    return pb.PrepareRequest(header=pb.PrepareHeader(
        backend=backend, activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[header_for(n, t) for n, t in layer.items()])))


class SplitUpload:
    """A raw Prepare call that sends the header and the chunks before ``held_from``, then waits for ``release``
    before it sends the rest (or, with ``corrupt``, a chunk whose CRC does not match, first)."""

    def __init__(self, stub, layer: dict[str, torch.Tensor], held_from: int, corrupt: bool = False) -> None:
        self.release = threading.Event()
        self.sent_all = threading.Event()
        chunks = list(encode_tensors(layer, CHUNK))
        if corrupt:
            chunks[held_from].crc32c ^= 1

        def requests():
            yield _header(layer)
            yield from (pb.PrepareRequest(chunk=chunk) for chunk in chunks[:held_from])
            if not self.release.wait(WAIT):
                return
            yield from (pb.PrepareRequest(chunk=chunk) for chunk in chunks[held_from:])
            self.sent_all.set()

        self.chunks = len(chunks)
        self.call = stub.Prepare(requests(), timeout=60)


def first_chunk_of(layer: dict[str, torch.Tensor], name: str) -> int:
    """Index of the first chunk of tensor ``name`` in the request (``encode_tensors`` order)."""
    return sum((t.numel() * t.element_size() + CHUNK - 1) // CHUNK for n, t in layer.items() if n != name
               and list(layer).index(n) < list(layer).index(name))


def test_the_answer_begins_before_the_request_ends(start_server, raw_stub, make_layer, same_tensors):
    server = start_server(chunk_size=CHUNK)
    layer = upload_order(make_layer(experts=8, hidden=1024, inter=512))
    # Held back: w2_weight and everything after it, so the answer's first weight (w13) can be sent meanwhile.
    upload = SplitUpload(raw_stub(server.address), layer, first_chunk_of(layer, "w2_weight"))
    responses = iter(upload.call)
    header = next(responses).header
    specs = read_headers(header.tensors, "header.tensors")
    sink = HostTensors(specs)
    receiver = TensorReceiver(specs, sink, "answer")
    receiver.add(next(responses).chunk)  # answered with the request still open
    assert not upload.sent_all.is_set()
    upload.release.set()
    for response in responses:
        receiver.add(response.chunk)
    receiver.finish()
    want = pipeline.prepare(layer, BACKEND)
    same_tensors(sink.tensors(), want.tensors)
    assert upload.sent_all.is_set()
    wait_for(lambda: idle(server))


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=ON_GPU)])
@pytest.mark.parametrize("shard", [{}, {"tp_rank": 1, "tp_size": 2},
                                   {"ep_rank": 1, "ep_size": 3, "expert_placement": "round_robin"}])
@pytest.mark.parametrize("bulk_streams", [0, 2])
def test_answered_early_over_gRPC_and_bulk_is_bit_exact(start_server, make_layer, same_tensors, caplog, shard,
                                                      bulk_streams, device):
    caplog.set_level(logging.INFO)
    server = start_server(chunk_size=CHUNK, devices=(device,),
                          **({"bulk_address": ("127.0.0.1", 0)} if bulk_streams else {}))
    layer = make_layer(experts=8, hidden=1024, inter=512)
    with PrepClient(server.address, chunk_size=CHUNK, bulk_streams=bulk_streams) as client:
        got = client.prepare_layer(layer, BACKEND, **shard)
    want = pipeline.prepare(layer, BACKEND, **shard)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    calls = [r for r in caplog.records if r.name == "nvfp4_prep.server.service" and getattr(r, "outcome", "") == "OK"]
    assert [getattr(r, "answered_early", False) for r in calls] == [True]
    assert [getattr(r, "bulk_streams", 0) for r in calls] == [bulk_streams]
    wait_for(lambda: idle(server))


def test_a_bad_chunk_after_the_answer_began_fails_the_call(start_server, raw_stub, make_layer):
    server = start_server(chunk_size=CHUNK)
    layer = upload_order(make_layer(experts=8, hidden=1024, inter=512))
    upload = SplitUpload(raw_stub(server.address), layer, first_chunk_of(layer, "w2_weight"), corrupt=True)
    responses = iter(upload.call)
    assert next(responses).WhichOneof("message") == "header"
    assert next(responses).WhichOneof("message") == "chunk"
    upload.release.set()
    with pytest.raises(grpc.RpcError) as caught:
        for _ in responses:
            pass
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "tensors[" in caught.value.details() and "(w2_weight).chunk.crc32c" in caught.value.details()
    wait_for(lambda: idle(server))


def test_a_client_gone_after_the_answer_began_leaves_the_server_idle(start_server, raw_stub, make_layer):
    server = start_server(chunk_size=CHUNK)
    layer = upload_order(make_layer(experts=8, hidden=1024, inter=512))
    upload = SplitUpload(raw_stub(server.address), layer, first_chunk_of(layer, "w2_weight"))
    responses = iter(upload.call)
    next(responses)
    next(responses)
    assert server.workers[0].budget.in_use > 0
    upload.call.cancel()
    wait_for(lambda: idle(server))
    assert server.service.outcomes["CANCELLED"] == 1


def test_a_bad_scale_is_refused_before_any_answer(start_server, raw_stub, make_layer):
    server = start_server(chunk_size=CHUNK)
    layer = upload_order(make_layer(experts=8, hidden=1024, inter=512))
    layer["w2_input_scale"][3] = float("nan")
    upload = SplitUpload(raw_stub(server.address), layer, first_chunk_of(layer, "w13_weight"))
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(upload.call))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("w2_input_scale: holds nan at index [3]")
    upload.release.set()
    wait_for(lambda: idle(server))


def test_a_layer_sent_weights_first_is_answered_once_its_scales_arrive(start_server, make_layer, same_tensors):
    # The server does not rely on the SDK's order: scales after the weights only delay the answer's start.
    server = start_server(chunk_size=CHUNK)
    layer = make_layer(experts=4, hidden=512, inter=256)
    assert next(iter(layer)) == "w13_weight"
    with grpc.insecure_channel(server.address) as channel:
        requests = [_header(layer), *(pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, CHUNK))]
        responses = list(prep_pb2_grpc.PrepStub(channel).Prepare(iter(requests), timeout=60))
    specs = read_headers(responses[0].header.tensors, "header.tensors")
    sink = HostTensors(specs)
    receiver = TensorReceiver(specs, sink, "answer")
    for response in responses[1:]:
        receiver.add(response.chunk)
    receiver.finish()
    same_tensors(sink.tensors(), pipeline.prepare(layer, BACKEND).tensors)
    wait_for(lambda: idle(server))
