"""Prepare through a real server and the real SDK: bit-exact with the in-process pipeline."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.client import PrepClient, Progress, mma_view
from nvfp4_prep.contract import layout

PREFIX = "model.layers.1.mlp.experts"


@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_every_backend_and_activation_is_bit_exact(prep_address, make_layer, same_tensors, backend, activation):
    layer = make_layer(experts=3, activation=activation, seed=zlib.crc32(f"{backend}/{activation}".encode()) % 1000)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(layer, backend, activation)
    want = pipeline.prepare(layer, backend, activation)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    assert got.scalars["g1_alphas"] == want.tensors["g1_alphas"].tolist()
    assert not got.cache_hit


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_per_expert_form_is_assembled_on_the_server(prep_address, make_layer, per_expert, same_tensors, fmt):
    stacked = make_layer(experts=3)
    experts = per_expert(stacked, fmt)
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(experts, "flashinfer_cutedsl")
    # The stacked layer the per-expert tensors were cut from, prepared in process.
    if fmt == "compressed-tensors":
        for name in ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale"):
            stacked[name] = torch.reciprocal(torch.reciprocal(stacked[name]))
    same_tensors(got.tensors, pipeline.prepare(stacked, "flashinfer_cutedsl").tensors)


def test_strict_policy_accepts_uniform_input_scales(prep_address, make_layer, same_tensors):
    layer = make_layer(experts=3)
    layer["w13_input_scale"] = torch.full_like(layer["w13_input_scale"], 0.75)
    layer["w2_input_scale"] = torch.full_like(layer["w2_input_scale"], 1.25)
    with PrepClient(prep_address) as client:
        for backend in ("vllm_cutlass", "flashinfer_cutlass"):
            got = client.prepare_layer(layer, backend, input_scale_policy="strict")
            assert got.layout["input_scale_policy"] == "strict"
            same_tensors(got.tensors, pipeline.prepare(layer, backend, input_scale_policy="strict").tensors)


def test_pinned_layout_version_is_accepted(prep_address, make_layer):
    with PrepClient(prep_address) as client:
        layer = client.prepare_layer(make_layer(), "flashinfer_trtllm",
                                     layout_version=layout.layout_id("flashinfer_trtllm"))
    assert layer.layout["layout_id"] == layout.layout_id("flashinfer_trtllm")


def test_mma_view_matches_the_pipelines(prep_address, make_layer):
    with PrepClient(prep_address) as client:
        got = client.prepare_layer(make_layer(experts=2, hidden=512, inter=128), "flashinfer_cutedsl")
    for name in ("w13_weight_scale", "w2_weight_scale"):
        view = got.mma_view(name)
        want = pipeline.mma_view(got.tensors[name])
        assert view.shape == want.shape and view.stride() == want.stride()
        assert view.data_ptr() == got.tensors[name].data_ptr()
        assert torch.equal(view.view(torch.uint8), want.view(torch.uint8))
    e, mp, kp = got.tensors["w13_weight_scale"].shape
    assert got.mma_view().shape == (32, 4, mp // 128, 4, kp // 4, e)
    with pytest.raises(ValueError, match="scale: has shape"):
        mma_view(torch.zeros(2, 100, 4, dtype=torch.uint8))


def test_progress_reports_both_phases_to_their_totals(prep_address, make_layer):
    events: list[Progress] = []
    layer = make_layer(experts=4, hidden=1024, inter=256)
    with PrepClient(prep_address, chunk_size=64 << 10) as client:
        got = client.prepare_layer(layer, "flashinfer_cutlass", progress=events.append)
    upload = [e for e in events if e.phase == "upload"]
    download = [e for e in events if e.phase == "download"]
    sent = sum(t.numel() * t.element_size() for t in layer.values())
    received = sum(t.numel() * t.element_size() for t in got.tensors.values())
    assert len(upload) > 1 and upload[-1] == Progress("upload", sent, sent)
    assert len(download) > 1 and download[-1] == Progress("download", received, received)
    assert all(a.done < b.done for a, b in itertools.pairwise(upload))


def test_cache_hit_streams_identical_bytes_and_counts(start_server, make_layer, same_tensors):
    server = start_server(cache_bytes=64 << 20)
    layer = make_layer(experts=2)
    with PrepClient(server.address) as client:
        first = client.prepare_layer(layer, "flashinfer_trtllm")
        assert (server.cache.hits, server.cache.misses) == (0, 1)
        second = client.prepare_layer({k: v.clone() for k, v in layer.items()}, "flashinfer_trtllm")
        assert (server.cache.hits, server.cache.misses) == (1, 1)
        other = client.prepare_layer(layer, "flashinfer_cutlass")
        assert (server.cache.hits, server.cache.misses) == (1, 2)
    assert not first.cache_hit and second.cache_hit and not other.cache_hit
    same_tensors(second.tensors, first.tensors)
    assert second.layout == first.layout
    assert server.cache.entries == 2 and server.cache.bytes > 0


def test_cache_evicts_least_recently_used(start_server, make_layer):
    prepared_size = sum(t.numel() * t.element_size()
                        for t in pipeline.prepare(make_layer(), "vllm_cutlass").tensors.values())
    server = start_server(cache_bytes=2 * prepared_size + 1)
    layers = [make_layer(seed=seed) for seed in range(3)]
    with PrepClient(server.address) as client:
        for layer in layers:
            client.prepare_layer(layer, "vllm_cutlass")
        assert server.cache.evictions == 1 and server.cache.entries == 2
        assert client.prepare_layer(layers[2], "vllm_cutlass").cache_hit
        assert not client.prepare_layer(layers[0], "vllm_cutlass").cache_hit


@pytest.mark.parametrize("name", ["qwen3moe_modelopt_nvfp4", "qwen3moe_ct_nvfp4"])
def test_checkpoint_reference_is_read_by_the_server(start_server, same_tensors, testdata, name):
    location = str(testdata / name)
    server = start_server(allowed_roots=(testdata,), cache_bytes=64 << 20)
    with PrepClient(server.address) as client:
        got = client.prepare_reference(location, PREFIX, "flashinfer_cutedsl")
        again = client.prepare_reference(location, PREFIX, "flashinfer_cutedsl")
    with open_checkpoint(location) as checkpoint:
        want = pipeline.prepare(checkpoint.read_layer(PREFIX), "flashinfer_cutedsl")
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout
    assert again.cache_hit and server.cache.hits == 1
