"""Tensor framing: round trips of every wire dtype, checksums, and each framing rule's error."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import (
    WIRE_DTYPES,
    ChecksumError,
    FramingError,
    HostTensors,
    TensorReceiver,
    check_scalars,
    crc32c,
    decode_chunk,
    encode_chunk,
    encode_tensors,
    header_for,
    layout_from_proto,
    layout_to_proto,
    read_headers,
    scalars_to_proto,
    torch_dtype,
)


def crc32c_bitwise(data: bytes) -> int:
    """CRC32C by its definition (reflected polynomial 0x82F63B78), one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def receive(tensors: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
    specs = read_headers([header_for(n, t) for n, t in tensors.items()], "tensors")
    sink = HostTensors(specs)
    receiver = TensorReceiver(specs, sink)
    for chunk in encode_tensors(tensors, chunk_size):
        receiver.add(chunk)
    receiver.finish()
    return sink.tensors()


def test_crc32c_matches_its_definition() -> None:
    assert crc32c(b"123456789") == crc32c_bitwise(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 5
    assert crc32c(data) == crc32c_bitwise(data)


@pytest.mark.parametrize("dtype_name", WIRE_DTYPES)
def test_every_wire_dtype_round_trips(dtype_name: str) -> None:
    dtype = torch_dtype(dtype_name)
    raw = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tensor = (raw % 2).bool() if dtype == torch.bool else raw.view(dtype)
    got = receive({"t": tensor}, 7 * 8)["t"]
    assert got.dtype == tensor.dtype and got.shape == tensor.shape
    got_bytes = got.contiguous().view(torch.uint8).numpy().tobytes()
    assert got_bytes == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_odd_sizes_scalars_empty_and_strided_tensors_round_trip() -> None:
    base = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10)
    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.uint8),
        "strided": base.t(),
        "odd": torch.arange(1001, dtype=torch.int16),
    }
    got = receive(tensors, 1 << 16)
    for name, tensor in tensors.items():
        assert got[name].shape == tensor.shape and torch.equal(got[name], tensor), name


def test_chunks_carry_offsets_and_checksums_of_their_bytes() -> None:
    tensor = torch.arange(1000, dtype=torch.int32)
    chunks = list(encode_tensors({"a": tensor}, 1024))
    assert [c.offset for c in chunks] == [0, 1024, 2048, 3072]
    assert b"".join(c.data for c in chunks) == tensor.numpy().tobytes()
    assert all(c.crc32c == crc32c_bitwise(c.data) for c in chunks)


def _receiver(tensors: dict[str, torch.Tensor]) -> tuple[TensorReceiver, list[pb.TensorChunk]]:
    specs = read_headers([header_for(n, t) for n, t in tensors.items()], "tensors")
    return TensorReceiver(specs, HostTensors(specs)), list(encode_tensors(tensors, 100))


TWO = {"a": torch.zeros(250, dtype=torch.uint8), "b": torch.ones(150, dtype=torch.uint8)}


def test_corrupted_chunk_is_a_checksum_error() -> None:
    receiver, chunks = _receiver(TWO)
    bad = pb.TensorChunk()
    bad.CopyFrom(chunks[1])
    bad.data = b"\x07" + bad.data[1:]
    receiver.add(chunks[0])
    with pytest.raises(ChecksumError, match=r"tensors\[0\] \(a\)\.chunk\.crc32c"):
        receiver.add(bad)


def test_a_checksum_computed_where_the_chunk_was_decoded_is_the_one_compared() -> None:
    receiver, chunks = _receiver(TWO)
    first, second = (decode_chunk(encode_chunk(c.tensor_index, c.offset, c.data), checksum=True) for c in chunks[:2])
    assert first.actual_crc32c == crc32c_bitwise(first.data)
    receiver.add(first)
    carried = second._replace(actual_crc32c=second.crc32c ^ 1)  # as if its bytes changed before they were checked
    with pytest.raises(ChecksumError, match=rf"tensors\[0\] \(a\)\.chunk\.crc32c.*{carried.actual_crc32c:#010x}"):
        receiver.add(carried)
    assert receiver.position == (0, len(first.data)), "the refused chunk was not taken"


@pytest.mark.parametrize("mutate, field", [
    (lambda c: setattr(c, "offset", c.offset + 1), r"tensors\[0\] \(a\)\.chunk\.offset"),
    (lambda c: setattr(c, "tensor_index", 1), "chunk.tensor_index"),
    (lambda c: setattr(c, "data", b""), r"tensors\[0\] \(a\)\.chunk\.data"),
    (lambda c: setattr(c, "data", bytes(300)), r"tensors\[0\] \(a\)\.chunk\.data"),
])
def test_out_of_order_or_oversized_chunks_name_the_field(mutate, field: str) -> None:
    receiver, chunks = _receiver(TWO)
    chunk = pb.TensorChunk()
    chunk.CopyFrom(chunks[0])
    mutate(chunk)
    with pytest.raises(FramingError, match=field):
        receiver.add(chunk)


def test_missing_bytes_and_extra_chunks_are_refused() -> None:
    receiver, chunks = _receiver(TWO)
    for chunk in chunks[:-1]:
        receiver.add(chunk)
    with pytest.raises(FramingError, match=r"tensors\[1\] \(b\): ended after 100 bytes"):
        receiver.finish()
    receiver.add(chunks[-1])
    receiver.finish()
    with pytest.raises(FramingError, match="after every tensor arrived"):
        receiver.add(chunks[-1])


@pytest.mark.parametrize("header, field", [
    (pb.TensorHeader(name="", dtype="uint8", shape=[2], byte_length=2), r"h\[0\]\.name"),
    (pb.TensorHeader(name="x", dtype="float4", shape=[2], byte_length=2), r"h\[0\] \(x\)\.dtype"),
    (pb.TensorHeader(name="x", dtype="uint8", shape=[2, -1], byte_length=2), r"h\[0\] \(x\)\.shape"),
    (pb.TensorHeader(name="x", dtype="float32", shape=[2], byte_length=2), r"h\[0\] \(x\)\.byte_length"),
])
def test_bad_headers_name_the_field(header: pb.TensorHeader, field: str) -> None:
    with pytest.raises(FramingError, match=field):
        read_headers([header], "h")


def test_duplicate_names_are_refused() -> None:
    header = pb.TensorHeader(name="x", dtype="uint8", shape=[4], byte_length=4)
    with pytest.raises(FramingError, match=r"h\[1\] \(x\)\.name: appears twice"):
        read_headers([header, header], "h")


def test_layout_and_scalars_survive_their_messages(make_layer) -> None:
    prepared = pipeline.prepare(make_layer(), "flashinfer_trtllm")
    message = pb.Layout.FromString(layout_to_proto(prepared.layout).SerializeToString())
    assert layout_from_proto(message) == prepared.layout
    scalars = pb.DerivedScalars.FromString(scalars_to_proto(prepared.tensors).SerializeToString())
    check_scalars(scalars, prepared.tensors, "s")
    assert list(scalars.g1_alphas) == prepared.tensors["g1_alphas"].tolist()
    tampered = dict(prepared.tensors, a2_gscale=prepared.tensors["a2_gscale"] * 2)
    with pytest.raises(FramingError, match=r"s\.a2_gscale: differs"):
        check_scalars(scalars, tampered, "s")
