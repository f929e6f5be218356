"""On a CUDA device: the same bytes as on the CPU, through both gather paths.

Skipped where no GPU exists (CI); run on the device machine with
``python -m pytest tests/pipeline/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS
from nvfp4_prep.pipeline import gather, prepare, unprepare
from tests.helpers.layer_factory import random_layer

GATED = {"swiglu": True, "swigluoai": True, "relu2": False}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def raw(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.cpu()
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden, inter", [(512, 256), (7168, 2048)])
def test_gpu_bytes_equal_cpu_bytes(monkeypatch, kernel, backend, activation, hidden, inter):
    monkeypatch.setattr(gather, "_KERNEL", kernel)
    cpu = random_layer(3, hidden, inter, GATED[activation], seed=hidden + inter)
    want = prepare(cpu, backend, activation)
    got = prepare({k: v.cuda() for k, v in cpu.items()}, backend, activation)
    assert got.layout == want.layout
    for name, tensor in want.tensors.items():
        assert got.tensors[name].is_cuda
        assert torch.equal(raw(got.tensors[name]), raw(tensor)), name
    restored = unprepare(got.tensors, got.layout)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(raw(restored[name]), raw(cpu[name])), name


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_trtllm_padding_equals_cpu(monkeypatch, kernel, activation):
    monkeypatch.setattr(gather, "_KERNEL", kernel)
    cpu = random_layer(2, 400, 80, GATED[activation], seed=5)
    want = prepare(cpu, "flashinfer_trtllm", activation)
    got = prepare({k: v.cuda() for k, v in cpu.items()}, "flashinfer_trtllm", activation)
    for name, tensor in want.tensors.items():
        assert torch.equal(raw(got.tensors[name]), raw(tensor)), name
