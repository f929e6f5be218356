"""The SDK's reading of an answer whose header it cannot trust: typed errors, never a raw RuntimeError."""

from __future__ import annotations

import math

import pytest

from nvfp4_prep.client.errors import PrepProtocolError
from nvfp4_prep.client.receiver import Answer
from nvfp4_prep.v1 import prep_pb2 as pb

ASKED = pb.PrepareHeader(backend="flashinfer_cutlass", activation="swiglu", input_scale_policy="max")


def answer_with(*tensors: pb.TensorHeader) -> list[pb.PrepareResponse]:
    return [pb.PrepareResponse(header=pb.PreparedHeader(tensors=list(tensors)))]


def test_a_header_announcing_more_than_the_host_can_allocate_is_a_protocol_error():
    shape = [1 << 20, 1 << 20, 1 << 20]  # 2**60 bytes: consistent, and more than any host holds
    answer = Answer(ASKED, None)
    with pytest.raises(PrepProtocolError) as info:
        answer.receive(iter(answer_with(pb.TensorHeader(name="w13_weight", dtype="uint8", shape=shape,
                                                        byte_length=math.prod(shape)))))
    assert info.value.field == "response.header.tensors"
    assert f"announce {math.prod(shape)} bytes" in info.value.details
    assert answer.resume_point is None


def test_a_byte_length_that_disagrees_with_shape_and_dtype_is_a_protocol_error():
    answer = Answer(ASKED, None)
    with pytest.raises(PrepProtocolError) as info:
        answer.receive(iter(answer_with(pb.TensorHeader(name="g1_alphas", dtype="float32", shape=[4],
                                                        byte_length=1 << 62))))
    assert info.value.field == "response.header.tensors[0] (g1_alphas).byte_length"
    assert "16 for shape [4] of float32" in info.value.details
