"""Where the SDK lands an answer: ``device=`` (CPU, or CUDA through pinned staging) and ``out=`` (the
caller's tensors, written in place), against a real server on loopback; mismatching ``out`` tensors are
refused with nothing written, and a broken stream resumes into them."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.client import PrepClient, PrepInvalidArgument
from nvfp4_prep.client.errors import PrepOutputMismatch, PrepProtocolError
from nvfp4_prep.client.landing import STAGING_BUFFERS, Placement
from nvfp4_prep.client.receiver import Answer, AnswerChanged
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import TensorReceiver, encode_tensors, header_for, read_headers
from tests.helpers.checkpoint_factory import dense_tensors, moe_layer_tensors, write_checkpoint
from tests.helpers.fault_proxy import CuttingProxy
from tests.helpers.layer_factory import random_layer

BACKEND = "flashinfer_cutlass"
PREFIX = "model.layers.0.mlp.experts"
CHUNK = 64 << 10
SENTINEL = 0xA5
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sentinel_like(tensors: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Tensors of the same names, shapes and dtypes on ``device``, every byte SENTINEL."""
    out = {}
    for name, tensor in tensors.items():
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        empty.reshape(-1).view(torch.uint8).fill_(SENTINEL)
        out[name] = empty
    return out


def untouched(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all()) for t in tensors.values())


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.cpu() for name, t in tensors.items()}


@pytest.fixture
def layer() -> dict[str, torch.Tensor]:
    return random_layer(4, 512, 256, seed=3)


@pytest.fixture
def want(layer) -> dict[str, torch.Tensor]:
    return pipeline.prepare(layer, BACKEND).tensors


# -- device= ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), pytest.param("cuda", marks=CUDA),
                                    pytest.param(torch.device("cuda", 0), marks=CUDA)])
def test_a_device_gets_the_plain_paths_bytes_there(prep_address, layer, same_tensors, device):
    with PrepClient(prep_address) as client:
        plain = client.prepare_layer(layer, BACKEND)
        landed = client.prepare_layer(layer, BACKEND, device=device)
    assert {t.device.type for t in landed.tensors.values()} == {torch.device(device).type}
    assert all(t.device.type == "cpu" for t in plain.tensors.values())
    same_tensors(on_cpu(landed.tensors), plain.tensors)
    assert landed.scalars == plain.scalars and landed.layout == plain.layout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_cuda_device_without_cuda_is_refused_by_name_before_any_call(prep_server, layer, device):
    with PrepClient(prep_server.address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, BACKEND, device=device)
    assert info.value.field == "device" and "CUDA is not available" in info.value.details
    with PrepClient(prep_server.address) as client, pytest.raises(PrepInvalidArgument) as info:
        list(client.prepare_layers([layer], BACKEND, device=device))
    assert info.value.field == "device"
    assert prep_server.service.outcomes == {}, "no call reached the server"


@pytest.mark.parametrize("device", ["gpu", "meta", 3, "cuda:-1x"])
def test_a_device_that_is_neither_cpu_nor_cuda_is_refused_by_name(prep_server, layer, device):
    with PrepClient(prep_server.address) as client, pytest.raises(PrepInvalidArgument) as info:
        client.prepare_layer(layer, BACKEND, device=device)
    assert info.value.field == "device" and repr(device) in info.value.details
    assert prep_server.service.outcomes == {}


def test_prepare_layers_takes_a_device_and_refuses_out(prep_address, layer, want, same_tensors):
    with PrepClient(prep_address) as client:
        got = list(client.prepare_layers([layer, layer], BACKEND, device="cpu", concurrency=2))
        with pytest.raises(PrepInvalidArgument) as info:
            list(client.prepare_layers([layer], BACKEND, out=sentinel_like(want, "cpu")))
    assert len(got) == 2
    for result in got:
        same_tensors(result.tensors, want)
    assert info.value.field == "out"


def test_a_staging_ring_below_the_minimum_is_refused_by_name():
    with pytest.raises(ValueError, match="staging_bytes"):
        PrepClient("127.0.0.1:1", staging_bytes=1024)


# -- out= ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_out_is_written_in_place(prep_address, layer, want, same_tensors, device):
    out = sentinel_like(want, device)
    pointers = {name: (t.data_ptr(), t.untyped_storage().data_ptr()) for name, t in out.items()}
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, BACKEND, out=out)
    assert list(got.tensors) == list(want)
    assert all(got.tensors[name] is out[name] for name in out), "the result holds the caller's tensors"
    assert {name: (t.data_ptr(), t.untyped_storage().data_ptr()) for name, t in out.items()} == pointers
    same_tensors(on_cpu(out), want)


def test_out_may_be_engine_parameters_that_require_grad(prep_address, layer, want, same_tensors):
    out = {name: torch.nn.Parameter(t, requires_grad=t.is_floating_point())
           for name, t in sentinel_like(want, "cpu").items()}
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, BACKEND, out=out)
    assert all(got.tensors[name] is out[name] for name in out)
    same_tensors({name: t.detach() for name, t in out.items()}, want)


@pytest.mark.parametrize("device", DEVICES)
def test_a_referenced_layer_lands_in_out_too(start_server, tmp_path, same_tensors, device):
    source = write_checkpoint(tmp_path / "models" / "ckpt", {**dense_tensors(512),
                                                             **moe_layer_tensors(0, 4, 512, 256)})
    server = start_server(allowed_roots=(tmp_path / "models",))
    want = pipeline.prepare(open_checkpoint(source).read_layer(PREFIX, "swiglu"), BACKEND).tensors
    out = sentinel_like(want, device)
    with PrepClient(server.address) as client:
        got = client.prepare_reference(str(source), PREFIX, BACKEND, out=out)
        landed = client.prepare_reference(str(source), PREFIX, BACKEND, device=device)
    assert all(got.tensors[name] is out[name] for name in out)
    same_tensors(on_cpu(out), want)
    same_tensors(on_cpu(landed.tensors), want)


def mismatches(want: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Case -> (the change made to a fitting out mapping, the field the refusal names, a phrase it says)."""
    first = next(iter(want))
    return {
        "missing name": (lambda out: out.pop("g1_alphas"), "out.g1_alphas", "has no tensor 'g1_alphas'"),
        "wrong shape": (lambda out: out.__setitem__(first, out[first][:1].clone()), f"out.{first}.shape",
                        f"the answer's {first} is {list(want[first].shape)}"),
        "wrong dtype": (lambda out: out.__setitem__("g2_alphas", out["g2_alphas"].to(torch.float64)),
                        "out.g2_alphas.dtype", "is torch.float64, the answer's g2_alphas is torch.float32"),
        "extra name": (lambda out: out.__setitem__("w13_bias", torch.zeros(4)), "out.w13_bias",
                       "is not in the answer"),
    }


@pytest.mark.parametrize("case", ["missing name", "wrong shape", "wrong dtype", "extra name"])
@pytest.mark.parametrize("device", DEVICES)
def test_an_out_mapping_that_does_not_fit_is_refused_with_nothing_written(prep_server, layer, want, case, device):
    change, field, phrase = mismatches(want)[case]
    out = sentinel_like(want, device)
    change(out)
    for tensor in out.values():
        tensor.reshape(-1).view(torch.uint8).fill_(SENTINEL)
    with PrepClient(prep_server.address) as client, pytest.raises(PrepOutputMismatch) as info:
        client.prepare_layer(layer, BACKEND, out=out)
    assert isinstance(info.value, PrepInvalidArgument)
    assert info.value.field == field and phrase in info.value.details
    assert untouched(out), "not a byte was written"
    assert prep_server.service.outcomes.get("OK", 0) == 0, "the call was cancelled at the header"


def test_out_tensors_that_are_not_row_major_or_not_tensors_are_refused_before_any_call(prep_server, layer, want):
    transposed = dict(sentinel_like(want, "cpu"))
    experts, rows, columns = want["w13_weight"].shape
    transposed["w13_weight"] = torch.empty(experts, columns, rows, dtype=torch.uint8).mT  # the shape, not the strides
    cases = {"out.w13_weight.stride": transposed, "out.g1_alphas": {**want, "g1_alphas": [1.0]},
             "out": [("w13_weight", want["w13_weight"])]}
    with PrepClient(prep_server.address) as client:
        for field, out in cases.items():
            with pytest.raises(PrepInvalidArgument) as info:
                client.prepare_layer(layer, BACKEND, out=out)
            assert info.value.field == field
        with pytest.raises(PrepInvalidArgument) as info:
            client.prepare_layer(layer, BACKEND, out=sentinel_like(want, "cpu"), device="cpu")
        assert info.value.field == "device"
    assert prep_server.service.outcomes == {}


# -- out= across a broken stream -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_out_resumes_after_a_broken_stream(start_server, same_tensors, device):
    server = start_server(chunk_size=CHUNK)
    layer = random_layer(8, 1024, 512)
    want = pipeline.prepare(layer, BACKEND).tensors
    out = sentinel_like(want, device)
    pointers = {name: t.data_ptr() for name, t in out.items()}
    proxy = CuttingProxy(server.port, cut_after=nbytes(want) // 2)  # resets the connection mid-answer
    try:
        with PrepClient(proxy.address, chunk_size=CHUNK) as client:
            got = client.prepare_layer(layer, BACKEND, out=out)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and server.service.outcomes == {"CANCELLED": 1, "OK": 1}
    assert proxy.downstream_bytes < nbytes(want) * 1.5, "resumed, not downloaded twice"
    assert all(got.tensors[name] is out[name] for name in out)
    assert {name: t.data_ptr() for name, t in out.items()} == pointers
    same_tensors(on_cpu(out), want)


def recorded_answer(stub, layer: dict[str, torch.Tensor], asked: pb.PrepareHeader) -> list[pb.PrepareResponse]:
    """The real server's whole answer to ``layer``, as protobuf messages."""
    header = pb.PrepareHeader()
    header.CopyFrom(asked)
    header.tensors.CopyFrom(pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                         tensors=[header_for(name, t) for name, t in layer.items()]))
    requests = [pb.PrepareRequest(header=header)] + [pb.PrepareRequest(chunk=chunk)
                                                     for chunk in encode_tensors(layer, CHUNK)]
    return list(stub.Prepare(iter(requests)))


@pytest.mark.parametrize("device", DEVICES)
def test_a_changed_answer_after_a_break_starts_over_overwriting_out(start_server, raw_stub, same_tensors, device):
    """The resumed attempt is answered for another layer (same shapes, other scales): its bytes are never
    mixed with the kept ones; the attempt after lands the new answer over them, in the same tensors."""
    server = start_server(chunk_size=CHUNK)
    stub = raw_stub(server.address)
    asked = pb.PrepareHeader(backend=BACKEND, activation="swiglu", input_scale_policy="max",
                             shard=pb.RankShard(tp_size=1, ep_size=1, expert_placement="linear"),
                             profile="seed", gated_group_size=64)
    first, second = random_layer(4, 512, 256, seed=1), random_layer(4, 512, 256, seed=2)
    answers = [recorded_answer(stub, layer, asked) for layer in (first, second)]
    want_first, want_second = (pipeline.prepare(layer, BACKEND).tensors for layer in (first, second))
    out = sentinel_like(want_first, device)
    answer = Answer(asked, None, Placement(out=out))
    with pytest.raises(PrepProtocolError):  # the first answer's stream ends half-way
        answer.receive(iter(answers[0][:len(answers[0]) // 2]))
    assert answer.resume_point is not None
    if device == "cpu":  # on a GPU the last bytes may still wait in the staging ring, kept for the resume
        assert not untouched(out), "bytes of the first answer landed before the break"
    with pytest.raises(AnswerChanged):
        answer.receive(iter(answers[1]))
    assert answer.resume_point is None, "the kept bytes were dropped"
    got = answer.receive(iter(answers[1]))
    assert all(got.tensors[key] is out[key] for key in out)
    same_tensors(on_cpu(out), want_second)


# -- the staging ring ----------------------------------------------------------------------------------

@CUDA
def test_the_staging_ring_stays_within_its_buffers(same_tensors):
    want = pipeline.prepare(random_layer(8, 1024, 512), BACKEND).tensors
    staging = 256 << 10  # four pinned buffers of 64 KiB for a layer of 3.5 MB
    specs = read_headers([header_for(name, t) for name, t in want.items()], "tensors")
    sink = Placement(device=torch.device("cuda", 0), staging_bytes=staging).landing(specs)
    receiver = TensorReceiver(specs, sink)
    for chunk in encode_tensors(want, CHUNK):
        receiver.add(chunk)
    receiver.finish()
    same_tensors(on_cpu(sink.tensors()), want)
    assert nbytes(want) > 4 * staging
    buffers = [buffer for ring in sink.rings.values() for buffer in ring.buffers]
    assert len(buffers) == STAGING_BUFFERS, "the layer cycled through the whole ring, and pinned no more"
    assert all(buffer.is_pinned() and buffer.numel() == staging // 4 for buffer in buffers)

