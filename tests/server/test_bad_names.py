"""Tensor names a client may send that once made the server answer INTERNAL, or answer with a status the
HTTP/2 layer refused: each is INVALID_ARGUMENT with an ASCII-safe, bounded message and trailer, as a raw stub
sees it from a real server."""

from __future__ import annotations

import grpc
import pytest
import torch

from nvfp4_prep.contract.expert_keys import MAX_EXPERT_INDEX
from nvfp4_prep.server.status import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import FIELD_METADATA_KEY, header_for

BACKEND = "flashinfer_cutlass"


def header_only(names: list[str], form: int) -> pb.PrepareRequest:
    tensor = torch.zeros(4, dtype=torch.uint8)
    return pb.PrepareRequest(header=pb.PrepareHeader(
        backend=BACKEND, activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=form, tensors=[header_for(name, tensor) for name in names])))


def refusal(stub, request: pb.PrepareRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Prepare(iter([request]), timeout=30))
    return info.value


def assert_safe(error: grpc.RpcError) -> None:
    """INVALID_ARGUMENT, with a message and a field trailer that are printable ASCII and bounded."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details()
    assert details.isascii() and details.isprintable() and len(details) <= MAX_MESSAGE_CHARS
    field = dict(error.trailing_metadata() or ()).get(FIELD_METADATA_KEY, "")
    assert field and field.isascii() and field.isprintable() and len(field) <= MAX_FIELD_CHARS


@pytest.mark.parametrize("digits", [5000, len(str(MAX_EXPERT_INDEX)) + 1])
def test_an_expert_index_beyond_the_bound_is_invalid_argument_naming_the_tensor(prep_address, raw_stub, digits):
    name = "1" * digits + ".gate_proj.weight"
    error = refusal(raw_stub(prep_address), header_only([name, "0.up_proj.weight"], pb.TENSOR_FORM_PER_EXPERT))
    assert_safe(error)
    assert f"expert index of {digits} digits" in error.details() and "1111111111" in error.details()
    assert f"from 0 to {MAX_EXPERT_INDEX}" in error.details()


@pytest.mark.parametrize("name", [
    "w13_w\u00e9ight\u2603",          # non-ASCII
    "w13\x00we\x01ight\n\r\x7f",      # control characters
    "w13_weight" + "x" * 20_000,      # far over 16 KB
], ids=["non-ascii", "control", "20k"])
def test_names_the_server_echoes_are_ascii_safe_and_bounded(prep_address, raw_stub, name):
    # The same name twice: the header check names it in the message and in the field trailer.
    error = refusal(raw_stub(prep_address), header_only([name, name], pb.TENSOR_FORM_STACKED))
    assert_safe(error)
    assert "appears twice" in error.details()


@pytest.mark.parametrize("name", ["0.gate_proj.w\u00e9ight", "0.gate_proj.\x00", "0." + "g" * 20_000],
                         ids=["non-ascii", "control", "20k"])
def test_per_expert_names_the_server_echoes_are_ascii_safe_and_bounded(prep_address, raw_stub, name):
    error = refusal(raw_stub(prep_address), header_only([name, "0.up_proj.weight"], pb.TENSOR_FORM_PER_EXPERT))
    assert_safe(error)
