"""Rank shards through a real server (SPEC section 11): a checkpoint reference with a shard reads only the rank's
bytes (counted by the server's ``nvfp4_prep_checkpoint_read_bytes_total``) and answers bit-exactly what
``pipeline.prepare(whole_layer, shard...)`` gives in process; a streamed input shard (``inputs_are_shard``)
answers what the whole layer streamed with the same shard gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.client import PrepClient, PrepInvalidArgument, PrepResourceExhausted
from tests.checkpoint.test_shard_reads import rank_bytes
from tests.helpers.checkpoint_factory import FORMATS, moe_checkpoint

PREFIX = "model.layers.0.mlp.experts"
EXPERTS, HIDDEN, INTER = 8, 512, 256
READ_BYTES = "nvfp4_prep_checkpoint_read_bytes_total"
CASES = [
    ("flashinfer_cutedsl", "swiglu", "seed", {"tp_rank": 1, "tp_size": 2, "ep_rank": 1, "ep_size": 2}),
    ("flashinfer_trtllm", "swigluoai", "seed", {"tp_rank": 3, "tp_size": 4}),
    ("flashinfer_cutlass", "swiglu", "vllm-0.33",
     {"tp_rank": 0, "tp_size": 2, "ep_rank": 2, "ep_size": 3, "expert_placement": "round_robin"}),
    ("vllm_cutlass", "relu2", "seed", {"ep_rank": 0, "ep_size": 4, "expert_placement": "round_robin"}),
    ("flashinfer_cutedsl", "swiglu", "vllm-0.33", {"tp_rank": 1, "tp_size": 4, "ep_rank": 1, "ep_size": 3}),
]


def read_bytes(server, backend: str) -> float:
    return server.metrics.registry.get_sample_value(READ_BYTES, {"backend": backend}) or 0.0


@pytest.fixture(params=FORMATS)
def store(request, tmp_path: Path) -> Path:
    """A root holding one checkpoint of the given format, of the shared testdata's sizes."""
    moe_checkpoint(tmp_path / "ckpt", 1, EXPERTS, HIDDEN, INTER, fmt=request.param, seed=3)
    return tmp_path


@pytest.mark.parametrize(("backend", "activation", "profile", "shard"), CASES,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_a_referenced_shard_reads_only_the_rank_bytes_and_is_bit_exact(start_server, store, same_tensors, backend,
                                                                       activation, profile, shard):
    server = start_server(allowed_roots=(store,))
    with open_checkpoint(store / "ckpt") as checkpoint:
        whole = checkpoint.read_layer(PREFIX, activation)
    want = pipeline.prepare(whole, backend, activation, profile=profile, **shard)
    with PrepClient(server.address) as client:
        got = client.prepare_reference(str(store / "ckpt"), PREFIX, backend, activation, profile=profile, **shard)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    assert read_bytes(server, backend) == rank_bytes(shard, EXPERTS, HIDDEN, INTER)


def test_a_whole_layer_reference_reads_the_whole_layer(start_server, store, same_tensors):
    server = start_server(allowed_roots=(store,))
    with open_checkpoint(store / "ckpt") as checkpoint:
        want = pipeline.prepare(checkpoint.read_layer(PREFIX), "flashinfer_cutlass")
        layer_bytes = checkpoint.bytes_read
    with PrepClient(server.address) as client:
        got = client.prepare_reference(str(store / "ckpt"), PREFIX, "flashinfer_cutlass")
    same_tensors(got.tensors, want.tensors)
    assert read_bytes(server, "flashinfer_cutlass") == layer_bytes == rank_bytes({}, EXPERTS, HIDDEN, INTER)


def test_admission_reserves_the_rank_bytes_not_the_layer(start_server, store, same_tensors):
    # A budget of the layer's input bytes: the whole layer (inputs and outputs) does not fit, a quarter of it does.
    server = start_server(allowed_roots=(store,), memory_budget=rank_bytes({}, EXPERTS, HIDDEN, INTER))
    shard = {"tp_rank": 1, "tp_size": 2, "ep_rank": 0, "ep_size": 2}
    with PrepClient(server.address, retries=0) as client:
        with pytest.raises(PrepResourceExhausted, match="memory budget"):
            client.prepare_reference(str(store / "ckpt"), PREFIX, "flashinfer_trtllm")
        got = client.prepare_reference(str(store / "ckpt"), PREFIX, "flashinfer_trtllm", **shard)
    with open_checkpoint(store / "ckpt") as checkpoint:
        same_tensors(got.tensors, pipeline.prepare(checkpoint.read_layer(PREFIX), "flashinfer_trtllm",
                                                   **shard).tensors)


def test_a_shard_the_referenced_layer_cannot_be_cut_into_is_refused_by_name(start_server, store):
    server = start_server(allowed_roots=(store,))
    with PrepClient(server.address, retries=0) as client:
        with pytest.raises(PrepInvalidArgument) as caught:
            client.prepare_reference(str(store / "ckpt"), PREFIX, "vllm_cutlass", tp_size=3)
        assert caught.value.field == "tp_size"
        with pytest.raises(PrepInvalidArgument) as caught:
            client.prepare_reference(str(store / "ckpt"), PREFIX, "vllm_cutlass", ep_size=EXPERTS + 1)
        assert caught.value.field == "ep_size"
        with pytest.raises(PrepInvalidArgument) as caught:
            client.prepare_reference(str(store / "ckpt"), PREFIX, "vllm_cutlass", tp_size=2, inputs_are_shard=True)
        assert caught.value.field == "header.shard.inputs_are_shard"
    assert read_bytes(server, "vllm_cutlass") == 0


STREAMED = [
    ("flashinfer_cutedsl", "swiglu", "seed", {"tp_rank": 1, "tp_size": 2, "ep_rank": 2, "ep_size": 3}),
    ("flashinfer_trtllm", "relu2", "vllm-0.33", {"ep_rank": 1, "ep_size": 2, "expert_placement": "round_robin"}),
    ("vllm_cutlass", "swigluoai", "seed", {"tp_rank": 0, "tp_size": 2, "ep_rank": 1, "ep_size": 2}),
]


@pytest.mark.parametrize(("backend", "activation", "profile", "shard"), STREAMED,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_a_streamed_input_shard_equals_the_whole_layer_streamed(prep_address, make_layer, same_tensors, backend,
                                                                activation, profile, shard):
    layer = make_layer(experts=5, hidden=256, inter=256, activation=activation, seed=4)
    piece = pipeline.cut_shard(layer, activation, **shard)
    with PrepClient(prep_address) as client:
        whole = client.prepare_layer(layer, backend, activation, profile=profile, **shard)
        got = client.prepare_layer(piece, backend, activation, profile=profile, inputs_are_shard=True, **shard)
    want = pipeline.prepare(layer, backend, activation, profile=profile, **shard)
    same_tensors(whole.tensors, want.tensors)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == whole.layout == want.layout


def test_the_cache_tells_an_input_shard_from_a_whole_layer_of_the_same_bytes(start_server, make_layer,
                                                                             same_tensors):
    """The same bytes streamed as the whole layer and as a rank's input shard, with the same shard, are two
    different layers (I = 256 cut in two, or I = 256 per rank) and get two answers."""
    server = start_server(cache_bytes=64 << 20)
    layer = make_layer(experts=2, hidden=256, inter=256)
    with PrepClient(server.address) as client:
        for _ in range(2):  # the second round comes from the cache
            as_layer = client.prepare_layer(layer, "flashinfer_cutlass", tp_rank=1, tp_size=2)
            as_shard = client.prepare_layer(layer, "flashinfer_cutlass", tp_rank=1, tp_size=2, inputs_are_shard=True)
            same_tensors(as_layer.tensors, pipeline.prepare(layer, "flashinfer_cutlass", tp_rank=1, tp_size=2).tensors)
            same_tensors(as_shard.tensors, pipeline.prepare(layer, "flashinfer_cutlass", tp_rank=1, tp_size=2,
                                                            inputs="shard").tensors)
    assert server.metrics.registry.get_sample_value("nvfp4_prep_cache_hits_total") == 2


def test_streamed_input_shards_of_the_wrong_shape_or_form_are_refused(prep_address, make_layer, per_expert):
    layer = make_layer(experts=4, hidden=256, inter=256)
    with PrepClient(prep_address, retries=0) as client:
        # The whole layer sent as the input shard of ep_rank 1 of 2.
        with pytest.raises(PrepInvalidArgument) as caught:
            client.prepare_layer(layer, "flashinfer_cutlass", ep_rank=1, ep_size=2, inputs_are_shard=True)
        assert caught.value.field == "w13_weight" and "[2, N1, H/2]" in str(caught.value)
        with pytest.raises(PrepInvalidArgument) as caught:
            client.prepare_layer(per_expert(layer), "flashinfer_cutlass", inputs_are_shard=True)
        assert caught.value.field == "header.shard.inputs_are_shard" and "TENSOR_FORM_STACKED" in str(caught.value)
