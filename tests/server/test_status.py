"""Status codes carry the field at fault as google.rpc details (read with grpcio-status) and as the
nvfp4-prep-field trailer; messages stay ASCII and bounded whatever the client sent."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nvfp4_prep.client import PrepClient, PrepInvalidArgument
from nvfp4_prep.server.status import MAX_MESSAGE_CHARS, bounded, status
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import FIELD_METADATA_KEY, encode_tensors, header_for


def _call(stub, header: pb.PrepareHeader, tensors=None) -> grpc.RpcError:
    requests = [pb.PrepareRequest(header=header)]
    requests += [pb.PrepareRequest(chunk=chunk) for chunk in encode_tensors(tensors or {}, 1 << 20)]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Prepare(iter(requests), timeout=30))
    return info.value


def _detail(error: grpc.RpcError, kind):
    details = rpc_status.from_call(error)
    assert details is not None and details.code == error.code().value[0]
    unpacked = []
    for packed in details.details:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            unpacked.append(detail)
    assert len(unpacked) == 1, details
    return unpacked[0]


def _stacked(layer) -> pb.TensorSet:
    return pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[header_for(n, t) for n, t in layer.items()])


def test_bad_input_is_a_bad_request_field_violation(prep_address, raw_stub, make_layer):
    layer = make_layer()
    error = _call(raw_stub(prep_address), pb.PrepareHeader(backend="no_such_backend", activation="swiglu",
                                                           input_scale_policy="max", tensors=_stacked(layer)), layer)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = _detail(error, error_details_pb2.BadRequest).field_violations[0]
    assert violation.field == "header.backend" and "flashinfer_cutedsl" in violation.description
    assert dict(error.trailing_metadata())[FIELD_METADATA_KEY] == "header.backend"


def test_budget_refusal_is_a_quota_failure(start_server, raw_stub, make_layer):
    server = start_server(memory_budget=1 << 16)
    layer = make_layer()
    error = _call(raw_stub(server.address), pb.PrepareHeader(backend="flashinfer_cutlass", activation="swiglu",
                                                             input_scale_policy="max", tensors=_stacked(layer)), layer)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _detail(error, error_details_pb2.QuotaFailure).violations[0].subject == "memory_budget"


def test_layout_mismatch_is_a_precondition_failure(prep_address, raw_stub, make_layer):
    layer = make_layer()
    header = pb.PrepareHeader(backend="flashinfer_cutlass", activation="swiglu", input_scale_policy="max",
                              layout_version="flashinfer_cutlass/fi9.9", tensors=_stacked(layer))
    error = _call(raw_stub(prep_address), header, layer)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    violation = _detail(error, error_details_pb2.PreconditionFailure).violations[0]
    assert violation.subject == "header.layout_version" and "fi9.9" in violation.description


def test_the_sdk_takes_the_field_from_the_details(prep_address, make_layer):
    layer = make_layer()
    layer["w13_weight"] = layer["w13_weight"].to("cpu").float()
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, "flashinfer_cutedsl")
    assert info.value.field == "w13_weight"


def test_messages_and_fields_are_ascii_and_bounded():
    hostile = "x\u00e9\n\x00" + "y" * 5000
    assert bounded("caf\u00e9\tok", 100) == "caf\\xe9\\tok"
    made = status(grpc.StatusCode.INVALID_ARGUMENT, hostile, hostile)
    assert len(made.details) <= MAX_MESSAGE_CHARS and made.details.isascii() and made.details.isprintable()
    assert made.details.startswith("x\\xe9\\n\\x00yyy") and "characters cut)..." in made.details
    assert made.details.endswith("yyy")
    field = made.field
    assert field.isascii() and field.isprintable() and len(field) <= 256
