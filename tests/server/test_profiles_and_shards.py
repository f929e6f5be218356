"""Profiles (SPEC section 10) and rank shards (SPEC section 11) through a real server and the SDK, and the
proto3 defaults of a header that omits fields (what grpcurl sends)."""

from __future__ import annotations

import grpc
import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient, PrepInvalidArgument, PrepLayoutMismatch
from nvfp4_prep.contract import layout
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import encode_tensors, header_for

SHARDS = [{}, {"tp_rank": 1, "tp_size": 2}, {"ep_rank": 1, "ep_size": 2, "expert_placement": "round_robin"},
          {"tp_rank": 0, "tp_size": 2, "ep_rank": 2, "ep_size": 3}]


@pytest.mark.parametrize("shard", SHARDS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "whole")
@pytest.mark.parametrize(("backend", "activation"), [("flashinfer_cutedsl", "swiglu"),
                                                     ("flashinfer_trtllm", "swigluoai_uninterleave"),
                                                     ("flashinfer_cutlass", "relu2"), ("vllm_cutlass", "swigluoai")])
def test_vllm_profile_shards_equal_the_pipelines(prep_address, make_layer, same_tensors, backend, activation, shard):
    # CuteDSL and TRT-LLM pad I=160 (per rank 80) under vllm-0.33; the CUTLASS backends need I % 64 per rank.
    inter = 160 if backend in ("flashinfer_cutedsl", "flashinfer_trtllm") else 256
    layer = make_layer(experts=3, hidden=384, inter=inter,
                       activation="swiglu" if activation == "swigluoai_uninterleave" else activation)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, backend, activation, profile="vllm-0.33", **shard)
    want = pipeline.prepare(layer, backend, activation, profile="vllm-0.33", **shard)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    assert got.layout["layout_id"] == layout.layout_id(backend, profile="vllm-0.33", activation=activation, **shard)


def test_gated_group_size_16_through_the_server(prep_address, make_layer, same_tensors):
    layer = make_layer(experts=2, hidden=256, inter=144)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, "flashinfer_cutedsl", gated_group_size=16)
    same_tensors(got.tensors, pipeline.prepare(layer, "flashinfer_cutedsl", gated_group_size=16).tensors)
    assert got.layout["gated_group_size"] == 16 and got.layout["flashinfer_release"] == "0.7.4"


def test_an_unknown_profile_is_failed_precondition_naming_it(prep_address, make_layer):
    with PrepClient(prep_address, retries=0) as client, pytest.raises(PrepLayoutMismatch) as caught:
        client.prepare_layer(make_layer(), "flashinfer_cutedsl", profile="vllm-0.34")
    assert caught.value.field == "header.profile" and "vllm-0.34" in str(caught.value)


def test_a_combination_vllm_does_not_run_is_refused_by_name(prep_address, make_layer):
    with PrepClient(prep_address, retries=0) as client, pytest.raises(PrepInvalidArgument) as caught:
        client.prepare_layer(make_layer(activation="swigluoai"), "flashinfer_trtllm", "swigluoai", profile="vllm-0.33")
    assert caught.value.field == "header.activation" and "swigluoai_uninterleave" in str(caught.value)


def test_a_rank_outside_its_size_is_refused(prep_address, make_layer):
    with PrepClient(prep_address, retries=0) as client, pytest.raises(PrepInvalidArgument) as caught:
        client.prepare_layer(make_layer(), "vllm_cutlass", ep_rank=2, ep_size=2)
    assert caught.value.field == "header.shard.ep_rank"


def test_omitted_header_fields_mean_their_documented_defaults(prep_address, raw_stub, make_layer, same_tensors):
    layer = make_layer(experts=2)
    header = pb.PrepareHeader(backend="flashinfer_cutlass", tensors=pb.TensorSet(
        form=pb.TENSOR_FORM_STACKED, tensors=[header_for(name, t) for name, t in layer.items()]))
    requests = [pb.PrepareRequest(header=header)] + [pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, 1 << 20)]
    try:
        answer = list(raw_stub(prep_address).Prepare(iter(requests), timeout=60))
    except grpc.RpcError as err:  # pragma: no cover - shown on failure
        pytest.fail(f"{err.code()}: {err.details()}")
    record = answer[0].header.layout
    want = pipeline.prepare(layer, "flashinfer_cutlass")
    assert (record.activation, record.input_scale_policy, record.profile, record.gated_group_size) == (
        "swiglu", "max", "seed", 64)
    assert record.layout_id == want.layout["layout_id"]
