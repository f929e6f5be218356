"""Every bad input gets its status code and a message naming the field, and disturbs no other call."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import (
    PrepChecksumError,
    PrepClient,
    PrepInvalidArgument,
    PrepLayoutMismatch,
    PrepNotFound,
    PrepPermissionDenied,
    PrepProtocolError,
)
from nvfp4_prep.contract import layout
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import Chunk, encode_tensors, header_for

PREFIX = "model.layers.0.mlp.experts"


def _shape_layer(make_layer, experts=2, n1=256, hidden=256, inter=128) -> dict[str, torch.Tensor]:
    """A random layer whose tensors have the given sizes, consistent except where a test breaks them."""
    layer = make_layer(experts=experts, hidden=hidden, inter=inter)
    layer["w13_weight"] = torch.zeros(experts, n1, hidden // 2, dtype=torch.uint8)
    layer["w13_weight_scale"] = torch.zeros(experts, n1, hidden // 16, dtype=torch.uint8)
    return layer


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]):
    def mutate(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layer[name] = value(layer[name])
        return layer
    return mutate


def _poke(name: str, value: float):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[0] = value
        return tensor
    return _set(name, change)


SPEC_CASES = {
    "odd N1": (lambda make: _shape_layer(make, n1=255), "flashinfer_cutlass", "w13_weight", "odd"),
    "cutedsl I % 64": (lambda make: make(hidden=256, inter=80), "flashinfer_cutedsl", "w2_weight", "I % 64"),
    "cutlass N1 % 128": (lambda make: make(hidden=256, inter=96), "flashinfer_cutlass", "w13_weight", "N1 % 128"),
    "H % 16": (lambda make: _set("w13_weight", lambda t: torch.zeros(2, 256, 132, dtype=torch.uint8))(make()),
               "flashinfer_trtllm", "w13_weight", "H"),
    "weight dtype": (lambda make: _set("w13_weight", lambda t: t.to(torch.float16))(make()),
                     "flashinfer_cutedsl", "w13_weight", "uint8"),
    "block scale dtype": (lambda make: _set("w2_weight_scale", lambda t: t.to(torch.float16))(make()),
                          "flashinfer_cutedsl", "w2_weight_scale", "float8_e4m3fn"),
    "global scale dtype": (lambda make: _set("w2_weight_scale_2", lambda t: t.double())(make()),
                           "vllm_cutlass", "w2_weight_scale_2", "float32"),
    "scale shape": (lambda make: _set("w13_weight_scale", lambda t: t[:, :, :8].contiguous())(make()),
                    "flashinfer_cutlass", "w13_weight_scale", "[2, 256, 16]"),
    "W2 against W13": (lambda make: _set("w2_weight", lambda t: t[:, :128].contiguous())(make()),
                       "flashinfer_cutlass", "w2_weight", "from w13_weight"),
    "no experts": (lambda make: {k: v[:0] for k, v in make().items()}, "flashinfer_cutlass", "w13_weight", "E = 0"),
    "NaN global scale": (lambda make: _poke("w13_weight_scale_2", float("nan"))(make()),
                         "flashinfer_cutedsl", "w13_weight_scale_2", "nan"),
    "infinite input scale": (lambda make: _poke("w13_input_scale", float("inf"))(make()),
                             "flashinfer_cutedsl", "w13_input_scale", "inf"),
    "zero global scale": (lambda make: _poke("w2_weight_scale_2", 0.0)(make()),
                          "flashinfer_trtllm", "w2_weight_scale_2", "0.0"),
    "negative input scale": (lambda make: _poke("w2_input_scale", -1.0)(make()),
                             "vllm_cutlass", "w2_input_scale", "-1.0"),
    "missing tensor": (lambda make: {k: v for k, v in make().items() if k != "w2_input_scale"},
                       "flashinfer_cutlass", "w2_input_scale", "missing"),
    "strict policy": (lambda make: make(experts=3), "flashinfer_cutlass", "w13_input_scale", "strict"),
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_spec_section_8_cases_are_invalid_argument_naming_the_field(prep_address, make_layer, case):
    build, backend, field, fragment = SPEC_CASES[case]
    layer = build(make_layer)
    with pytest.raises(pipeline.PrepError):  # the in-process pipeline refuses it too
        pipeline.prepare(layer, backend, input_scale_policy="strict" if case == "strict policy" else "max")
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, backend, input_scale_policy="strict" if case == "strict policy" else "max")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field
    assert info.value.details.startswith(f"{field}:") and fragment in info.value.details


@pytest.mark.parametrize("drop, fragment", [
    (lambda name: name.startswith("1."), "expert"),
    (lambda name: name == "1.up_proj.input_scale", "1.up_proj"),
])
def test_per_expert_gaps_are_invalid_argument(prep_address, make_layer, per_expert, drop, fragment):
    experts = {k: v for k, v in per_expert(make_layer(experts=3)).items() if not drop(k)}
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(experts, "flashinfer_cutlass")
    assert info.value.field and fragment in info.value.details


@pytest.mark.parametrize("kwargs, field", [
    ({"backend": "flashinfer_magic"}, "header.backend"),
    ({"activation": "gelu"}, "header.activation"),
    ({"input_scale_policy": "mean"}, "header.input_scale_policy"),
])
def test_bad_parameters_name_the_header_field(prep_address, make_layer, kwargs, field):
    args = {"backend": "flashinfer_cutlass", **kwargs}
    with PrepClient(prep_address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(make_layer(), **args)
    assert info.value.field == field and field in info.value.details


def test_unproducible_layout_version_is_failed_precondition(prep_address, make_layer):
    with PrepClient(prep_address) as client, pytest.raises(PrepLayoutMismatch) as info:
        client.prepare_layer(make_layer(), "flashinfer_cutlass", layout_version="flashinfer_cutlass/fi0.6/t128/sf16/p1")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.field == "header.layout_version"
    assert layout.layout_id("flashinfer_cutlass") in info.value.details


# -- protocol violations, sent with the raw stub -------------------------------------------------

def _header(tensors: dict[str, torch.Tensor], form=pb.TENSOR_FORM_STACKED) -> pb.PrepareRequest:
    return pb.PrepareRequest(header=pb.PrepareHeader(
        backend="flashinfer_cutlass", activation="swiglu", input_scale_policy="max",
        tensors=pb.TensorSet(form=form, tensors=[header_for(n, t) for n, t in tensors.items()])))


def _chunks(tensors: dict[str, torch.Tensor], chunk_size: int = 4096) -> list[pb.PrepareRequest]:
    return [pb.PrepareRequest(chunk=c) for c in encode_tensors(tensors, chunk_size)]


def _rpc_error(stub, messages: list[pb.PrepareRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Prepare(iter(messages), timeout=30))
    return info.value


def _field(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("nvfp4-prep-field", "")


def test_corrupted_chunk_is_data_loss(prep_address, raw_stub, make_layer):
    layer = make_layer()
    chunks = _chunks(layer)
    chunks[3].chunk.data = bytes([chunks[3].chunk.data[0] ^ 0x01]) + chunks[3].chunk.data[1:]
    error = _rpc_error(raw_stub(prep_address), [_header(layer), *chunks])
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert _field(error) == "tensors[0] (w13_weight).chunk.crc32c"
    assert "CRC32C" in error.details()


class Tamper(grpc.StreamStreamClientInterceptor):
    """Alters one Prepare message in transit: request ``number`` or response ``number``.

    Requests travel as protobuf messages (the header) or encoded chunk bytes,
    responses arrive as protobuf messages (the header) or decoded chunks.
    """

    def __init__(self, direction: str, number: int, change: Callable[[object], object]) -> None:
        self.direction, self.number, self.change = direction, number, change

    def _altered(self, messages):
        for index, message in enumerate(messages):
            yield self.change(message) if index == self.number else message

    def intercept_stream_stream(self, continuation, details, requests):
        if self.direction == "request":
            return continuation(details, self._altered(requests))
        return _Responses(continuation(details, requests), self._altered)


class _Responses:
    """A call whose responses pass through ``alter``; cancel() reaches the real call."""

    def __init__(self, call, alter) -> None:
        self._call, self._messages = call, alter(call)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._messages)

    def cancel(self) -> bool:
        return self._call.cancel()


def _flipped(data) -> bytes:
    data = bytes(data)
    return bytes([data[0] ^ 0x80]) + data[1:]


def _corrupt_request_chunk(encoded: bytes) -> bytes:
    message = pb.PrepareRequest.FromString(encoded)
    message.chunk.data = _flipped(message.chunk.data)  # the CRC32C stays the original's
    return message.SerializeToString()


def _corrupt_response_chunk(chunk: Chunk) -> Chunk:
    return chunk._replace(data=memoryview(_flipped(chunk.data)))


def test_sdk_maps_upload_corruption_to_checksum_error(prep_address, make_layer):
    with PrepClient(prep_address, interceptors=[Tamper("request", 2, _corrupt_request_chunk)]) as client:
        with pytest.raises(PrepChecksumError) as info:
            client.prepare_layer(make_layer(), "flashinfer_cutlass")
    assert info.value.code == grpc.StatusCode.DATA_LOSS and info.value.field.endswith(".chunk.crc32c")


def test_sdk_verifies_response_checksums(prep_address, make_layer):
    with PrepClient(prep_address, interceptors=[Tamper("response", 1, _corrupt_response_chunk)]) as client:
        with pytest.raises(PrepChecksumError) as info:
            client.prepare_layer(make_layer(), "flashinfer_cutlass")
    assert info.value.code is None and info.value.field == "response.tensors[0] (w13_weight).chunk.crc32c"


def test_sdk_verifies_the_layout_record_and_scalars(prep_address, make_layer):
    def other_backend(message: pb.PrepareResponse) -> pb.PrepareResponse:
        changed = pb.PrepareResponse.FromString(message.SerializeToString())
        changed.header.layout.backend = "vllm_cutlass"
        return changed

    def other_alpha(message: pb.PrepareResponse) -> pb.PrepareResponse:
        changed = pb.PrepareResponse.FromString(message.SerializeToString())
        changed.header.scalars.g1_alphas[0] *= 2
        return changed

    with PrepClient(prep_address, interceptors=[Tamper("response", 0, other_backend)]) as client:
        with pytest.raises(PrepLayoutMismatch, match=r"layout\.backend"):
            client.prepare_layer(make_layer(), "flashinfer_cutlass")
    with PrepClient(prep_address, interceptors=[Tamper("response", 0, other_alpha)]) as client:
        with pytest.raises(PrepProtocolError, match=r"scalars\.g1_alphas"):
            client.prepare_layer(make_layer(), "flashinfer_cutlass")


@pytest.mark.parametrize("case", ["dtype", "byte_length", "form", "chunk first", "offset", "short", "two headers"])
def test_protocol_violations_name_the_field(prep_address, raw_stub, make_layer, case):
    layer = make_layer()
    header, chunks = _header(layer), _chunks(layer)
    field = {
        "dtype": "header.tensors.tensors[0] (w13_weight).dtype",
        "byte_length": "header.tensors.tensors[1] (w13_weight_scale).byte_length",
        "form": "header.tensors.form",
        "chunk first": "request.header",
        "offset": "tensors[0] (w13_weight).chunk.offset",
        "short": "tensors[7] (w2_input_scale)",
        "two headers": "request.header",
    }[case]
    if case == "dtype":
        header.header.tensors.tensors[0].dtype = "float4_e2m1"
    elif case == "byte_length":
        header.header.tensors.tensors[1].byte_length += 1
    elif case == "form":
        header.header.tensors.form = pb.TENSOR_FORM_UNSPECIFIED
    elif case == "chunk first":
        header = chunks[0]
    elif case == "offset":
        chunks[1].chunk.offset += 16
    elif case == "short":
        chunks = chunks[:-1]
    elif case == "two headers":
        chunks.insert(2, _header(layer))
    error = _rpc_error(raw_stub(prep_address), [header, *chunks])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _field(error) == field and error.details().startswith(field)


# -- checkpoint references -----------------------------------------------------------------------

def test_references_are_refused_without_allowed_roots(prep_address, testdata):
    with PrepClient(prep_address) as client, pytest.raises(PrepPermissionDenied) as info:
        client.prepare_reference(str(testdata / "qwen3moe_modelopt_nvfp4"), PREFIX, "flashinfer_cutlass")
    assert info.value.field == "header.ref.location" and "--allowed-root" in info.value.details


def test_reference_errors_map_to_their_codes(start_server, testdata, tmp_path: Path):
    server = start_server(allowed_roots=(str(tmp_path),))
    with PrepClient(server.address) as client:
        with pytest.raises(PrepPermissionDenied, match="outside the allowed roots"):
            client.prepare_reference(str(testdata / "qwen3moe_modelopt_nvfp4"), PREFIX, "flashinfer_cutlass")
        with pytest.raises(PrepNotFound) as info:
            client.prepare_reference(str(tmp_path / "absent"), PREFIX, "flashinfer_cutlass")
        assert info.value.field == "header.ref"
        with pytest.raises(PrepInvalidArgument, match=r"header\.ref\.layer_prefix"):
            client.prepare_reference(str(tmp_path), "", "flashinfer_cutlass")


def test_unknown_layer_prefix_is_not_found(start_server, testdata):
    server = start_server(allowed_roots=(testdata,))
    with PrepClient(server.address) as client, pytest.raises(PrepNotFound, match=r"model\.layers\.9\.mlp\.experts"):
        client.prepare_reference(str(testdata / "qwen3moe_modelopt_nvfp4"), "model.layers.9.mlp.experts",
                                 "flashinfer_cutlass")


# -- isolation -----------------------------------------------------------------------------------

def test_bad_requests_do_not_disturb_good_ones(prep_address, make_layer, same_tensors):
    good = make_layer(experts=4, hidden=512, inter=256)
    want = pipeline.prepare(good, "flashinfer_trtllm").tensors
    bad = _poke("w2_input_scale", float("nan"))(make_layer(experts=4, hidden=512, inter=256))
    results: dict[int, object] = {}

    def run(index: int) -> None:
        try:
            with PrepClient(prep_address, chunk_size=64 << 10) as client:
                results[index] = client.prepare_layer(good if index % 2 else bad, "flashinfer_trtllm")
        except Exception as err:  # collected and checked below
            results[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in results.items():
        if index % 2:
            same_tensors(result.tensors, want)
        else:
            assert isinstance(result, PrepInvalidArgument) and result.field == "w2_input_scale"
    assert len(results) == 8


def test_client_refuses_bad_settings():
    with pytest.raises(ValueError, match="chunk_size"):
        PrepClient("127.0.0.1:1", chunk_size=10)
    with pytest.raises(ValueError, match="targets"):
        PrepClient(["db.internal:1", "10.0.0.1:2"])
    with pytest.raises(ValueError, match="targets"):
        PrepClient("")
