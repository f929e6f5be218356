"""Fuzzing the Prepare stream of a real server with hypothesis: bytes that are not protobuf, and valid
streams mutated (chunks reordered, duplicated, dropped, cut; lying offsets, lengths, checksums, headers).

Every mutated stream must get an error status that blames the request, never OK, INTERNAL or UNKNOWN;
correct requests interleaved with them must keep succeeding bit-exactly; and afterwards the server must
hold no memory: its budget, its live tensors and its calls back to zero, its resident set within a
tolerance of where it started.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient
from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.server import PrepServer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import crc32c, decode_chunk, encode_chunk, header_for, iter_pieces
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutedsl"
CHUNK = 16 << 10
# Statuses that say the request was at fault (a reference parsed out of random bytes is PERMISSION_DENIED:
# this server reads no checkpoints).
BLAMES_THE_REQUEST = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.PERMISSION_DENIED}
RSS_TOLERANCE = 96 << 20
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server():
    server = PrepServer(ServeConfig(host="127.0.0.1", port=0, devices=("cpu",), memory_budget=256 << 20,
                                    metrics_port=0)).start()
    try:
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def layer():
    return random_layer(2, 256, 128)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def send(channel: grpc.Channel, messages: list[bytes]) -> grpc.StatusCode:
    """Sends raw request messages; the call's status."""
    call = channel.stream_stream("/nvfp4_prep.v1.Prep/Prepare")(iter(messages), timeout=30)
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Checker:
    """Sends a correct request every ``every`` fuzz cases and checks its answer against the pipeline."""

    def __init__(self, server: PrepServer, layer, every: int = 15) -> None:
        self.client = PrepClient(server.address, retries=0)
        self.layer = layer
        self.want = pipeline.prepare(layer, BACKEND).tensors
        self.every = every
        self.cases = 0

    def tick(self, same_tensors) -> None:
        self.cases += 1
        if self.cases % self.every == 0:
            same_tensors(self.client.prepare_layer(self.layer, BACKEND).tensors, self.want)


# -- a valid stream and its mutations ----------------------------------------------------------------

def header_message(headers: list[pb.TensorHeader]) -> bytes:
    return pb.PrepareRequest(header=pb.PrepareHeader(
        backend=BACKEND, activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=headers))).SerializeToString()


def valid_stream(layer) -> tuple[list[pb.TensorHeader], list[bytes]]:
    headers = [header_for(name, tensor) for name, tensor in layer.items()]
    chunks = [encode_chunk(i, offset, data) for i, offset, data in iter_pieces(list(layer.values()), CHUNK)]
    return headers, chunks


def rechunk(message: bytes, *, index: int | None = None, offset: int | None = None, data: bytes | None = None,
            crc: int | None = None) -> bytes:
    """A chunk message with some fields replaced (the CRC follows new data unless given)."""
    chunk = decode_chunk(message)
    data = bytes(chunk.data) if data is None else data
    replaced = pb.TensorChunk(tensor_index=chunk.tensor_index if index is None else index,
                              offset=chunk.offset if offset is None else offset, data=data,
                              crc32c=crc32c(data) if crc is None else crc)
    return pb.PrepareRequest(chunk=replaced).SerializeToString()


MUTATIONS = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("duplicate"), st.integers(0, 99)),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("flip crc"), st.integers(0, 99), st.integers(0, 31)),
    st.tuples(st.just("flip data"), st.integers(0, 99), st.integers(0, CHUNK - 1)),
    st.tuples(st.just("offset"), st.integers(0, 99), st.integers(-CHUNK, 2**40).filter(bool)),
    st.tuples(st.just("tensor index"), st.integers(0, 99), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("longer data"), st.integers(0, 99), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("shorter data"), st.integers(0, 99), st.integers(1, CHUNK)),
    st.tuples(st.just("header length"), st.integers(0, 7), st.integers(-(1 << 20), 2**63).filter(bool)),
    st.tuples(st.just("header shape"), st.integers(0, 7), st.integers(0, 3), st.integers(0, 2**31)),
    st.tuples(st.just("header dtype"), st.integers(0, 7),
              st.sampled_from(["", "int8", "float16", "bfloat16", "float64", "uint8 ", "torch.uint8", "complex64"])),
    st.tuples(st.just("huge tensor"), st.integers(0, 7), st.integers(20, 62)),
    st.tuples(st.just("header again"), st.integers(0, 99)),
    st.tuples(st.just("cut message"), st.integers(0, 99), st.integers(0, 64)),
    st.tuples(st.just("end early"), st.integers(0, 99)),
)


def mutate(headers: list[pb.TensorHeader], chunks: list[bytes], mutation: tuple) -> list[pb.TensorHeader]:
    """Applies ``mutation`` to ``chunks`` in place; the (maybe changed) headers."""
    op, at, *rest = mutation
    i = at % len(chunks) if chunks else 0
    if op in ("header length", "header shape", "header dtype", "huge tensor"):
        headers = [pb.TensorHeader.FromString(h.SerializeToString()) for h in headers]
        target = headers[at % len(headers)]
        if op == "header length":
            target.byte_length = max(0, min(2**64 - 1, target.byte_length + rest[0]))
        elif op == "header shape":
            if target.shape:
                target.shape[rest[0] % len(target.shape)] = rest[1]
            else:
                target.shape.append(rest[1])
        elif op == "header dtype":
            target.dtype = rest[0]
        else:  # consistent but enormous: 2**bits bytes of uint8
            del target.shape[:]
            target.shape.extend([1 << (rest[0] // 2), 1 << (rest[0] - rest[0] // 2)])
            target.dtype, target.byte_length = "uint8", 1 << rest[0]
        return headers
    if not chunks:
        return headers
    if op in ("flip crc", "flip data", "offset", "tensor index", "longer data", "shorter data") and \
            decode_chunk(chunks[i]) is None:
        return headers  # an earlier mutation made this message something else than a chunk
    if op == "swap":
        j = rest[0] % len(chunks)
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == "duplicate":
        chunks.insert(i, chunks[i])
    elif op == "drop":
        del chunks[i]
    elif op == "flip crc":
        chunks[i] = rechunk(chunks[i], crc=decode_chunk(chunks[i]).crc32c ^ (1 << rest[0]))
    elif op == "flip data":
        data = bytearray(decode_chunk(chunks[i]).data)
        data[rest[0] % len(data)] ^= 0x01
        chunks[i] = rechunk(chunks[i], data=bytes(data), crc=decode_chunk(chunks[i]).crc32c)
    elif op == "offset":
        chunks[i] = rechunk(chunks[i], offset=max(0, decode_chunk(chunks[i]).offset + rest[0]))
    elif op == "tensor index":
        chunks[i] = rechunk(chunks[i], index=rest[0])
    elif op == "longer data":
        chunks[i] = rechunk(chunks[i], data=bytes(decode_chunk(chunks[i]).data) + rest[0])
    elif op == "shorter data":
        data = bytes(decode_chunk(chunks[i]).data)
        chunks[i] = rechunk(chunks[i], data=data[:max(1, len(data) - rest[0])])
    elif op == "header again":
        chunks.insert(i, header_message(headers))
    elif op == "cut message":
        chunks[i] = chunks[i][:min(rest[0], len(chunks[i]) - 1)]
    elif op == "end early":
        del chunks[i:]
    return headers


def test_mutated_streams_are_refused_and_the_server_keeps_serving(server, channel, layer, same_tensors):
    base_headers, base_chunks = valid_stream(layer)
    base = [header_message(base_headers), *base_chunks]
    checker = Checker(server, layer)
    assert send(channel, base) == grpc.StatusCode.OK
    wait_for(lambda: idle(server))
    before = rss()
    seen: dict[str, int] = {}

    @FUZZ
    @given(st.lists(MUTATIONS, min_size=1, max_size=3))
    def case(mutations):
        headers, chunks = base_headers, list(base_chunks)
        for mutation in mutations:
            headers = mutate(headers, chunks, mutation)
        messages = [header_message(headers), *chunks]
        status = send(channel, messages)
        seen[status.name] = seen.get(status.name, 0) + 1
        if messages == base:
            assert status == grpc.StatusCode.OK
        else:
            assert status in BLAMES_THE_REQUEST, (mutations, status)
        checker.tick(same_tensors)

    case()
    checker.client.close()
    wait_for(lambda: idle(server))
    assert rss() - before < RSS_TOLERANCE, f"resident set grew by {(rss() - before) >> 20} MiB"
    assert {"INVALID_ARGUMENT", "DATA_LOSS", "RESOURCE_EXHAUSTED"} <= seen.keys(), seen
    assert "INTERNAL" not in server.service.outcomes and "UNKNOWN" not in server.service.outcomes


def test_bytes_that_are_not_requests_are_invalid_argument(server, channel, layer, same_tensors):
    headers, chunks = valid_stream(layer)
    prefixes = st.sampled_from([b"", header_message(headers), chunks[0]])
    checker = Checker(server, layer)
    wait_for(lambda: idle(server))
    before = rss()

    @FUZZ
    @given(prefixes, st.lists(st.binary(max_size=256), min_size=1, max_size=4))
    def case(prefix, garbage):
        messages = ([prefix] if prefix else []) + garbage
        status = send(channel, messages)
        assert status in BLAMES_THE_REQUEST, (messages, status)
        checker.tick(same_tensors)

    case()
    checker.client.close()
    wait_for(lambda: idle(server))
    assert rss() - before < RSS_TOLERANCE
    assert "INTERNAL" not in server.service.outcomes and "UNKNOWN" not in server.service.outcomes


def test_undecodable_message_names_its_position(channel, layer):
    headers, _ = valid_stream(layer)
    call = channel.stream_stream("/nvfp4_prep.v1.Prep/Prepare")(iter([header_message(headers), b"\xff\xff\xff"]),
                                                                timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request[1]" in info.value.details() and "PrepareRequest" in info.value.details()
