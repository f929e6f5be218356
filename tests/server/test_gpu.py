"""The server on a CUDA device: pinned staging, asynchronous copies, bytes equal to the CPU pipeline's.

Skipped where no GPU exists (CI); run on the device machine with
``python -m pytest tests/server/test_gpu.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.client import PrepClient, Progress
from nvfp4_prep.contract import layout
from tests.helpers.server_state import settled

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]



@pytest.fixture
def gpu_server(start_server):
    # Small chunks so that a layer cycles the pinned ring many times in both directions.
    return start_server(devices=("cuda:0",), memory_budget=8 << 30, chunk_size=64 << 10)


@pytest.mark.parametrize("activation", layout.ACTIVATIONS)
@pytest.mark.parametrize("backend", layout.BACKENDS)
def test_gpu_server_is_bit_exact_with_the_cpu_pipeline(gpu_server, make_layer, same_tensors, backend, activation):
    layer = make_layer(experts=4, hidden=1024, inter=256, activation=activation, seed=7)
    with PrepClient(gpu_server.address, chunk_size=96 << 10) as client:
        got = client.prepare_layer(layer, backend, activation)
    want = pipeline.prepare(layer, backend, activation)
    same_tensors(got.tensors, want.tensors)
    assert got.layout == want.layout


def test_gpu_server_assembles_per_expert_tensors(gpu_server, make_layer, per_expert, same_tensors):
    stacked = make_layer(experts=3, hidden=512, inter=256)
    with PrepClient(gpu_server.address) as client:
        got = client.prepare_layer(per_expert(stacked), "flashinfer_cutedsl")
    same_tensors(got.tensors, pipeline.prepare(stacked, "flashinfer_cutedsl").tensors)


def test_gpu_concurrent_layers_are_each_exact(gpu_server, make_layer, same_tensors):
    layers = [make_layer(experts=8, hidden=1024, inter=512, seed=s) for s in range(4)]
    with PrepClient(gpu_server.address, channels=2) as client:
        results = list(client.prepare_layers(layers, "flashinfer_trtllm", concurrency=4))
    for layer, result in zip(layers, results, strict=True):
        same_tensors(result.tensors, pipeline.prepare(layer, "flashinfer_trtllm").tensors)


@pytest.mark.parametrize("phase", ["upload", "download"])
def test_gpu_memory_returns_to_idle_after_a_cancel(gpu_server, make_layer, phase):
    layer = make_layer(experts=16, hidden=2048, inter=512)
    worker = gpu_server.workers[0]
    with PrepClient(gpu_server.address) as client:
        client.prepare_layer(layer, "flashinfer_cutlass")  # warm-up: plans and kernels cached
    assert settled(lambda: worker.live.value == 0)
    torch.cuda.synchronize()
    idle = torch.cuda.memory_allocated(0)

    class Stop(Exception):
        pass

    seen = threading.Event()

    def stop(event: Progress) -> None:
        if event.phase == phase and event.done > 1 << 20:
            seen.set()
            raise Stop

    with PrepClient(gpu_server.address) as client, pytest.raises(Stop):
        client.prepare_layer(layer, "flashinfer_cutlass", progress=stop)
    assert seen.is_set()
    assert settled(lambda: gpu_server.service.in_flight == 0 and worker.budget.in_use == 0 and worker.live.value == 0)
    assert settled(lambda: torch.cuda.memory_allocated(0) == idle), (torch.cuda.memory_allocated(0), idle)
