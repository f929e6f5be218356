"""A layer preparer that runs the pipeline in this process: ``prepare`` without ``--server``.

No loopback server, no serialisation: the layer read from the checkpoint goes to the device (a CUDA
GPU when there is one, else the CPU), through ``nvfp4_prep.pipeline.prepare`` and back to host memory
for the writer. The prepare job calls it from two worker threads; on a GPU each thread queues its
layer's copies and kernels on a stream of its own, so one layer's upload overlaps the other's compute
and download, and the prepared tensors come back into page-locked memory (full-speed copies, memory
that torch's host allocator hands to the next layer once the writer has dropped this one).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from nvfp4_prep.pipeline import PreparedLayer, prepare, prepare_quantized


def default_device() -> torch.device:
    """The first CUDA device when torch sees one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor in page-locked host memory, queued on the current stream (not waited for)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


class InProcessPreparer:
    """``(stacked, backend, activation, policy, **options) -> PreparedLayer`` on ``device``, in host memory.

    With ``quantize`` (a recipe) the tensors are high-precision weights, quantized on the device with
    ``activation_scales`` and prepared in the same pass (``pipeline.prepare_quantized``), as a server does."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self._threads = threading.local()  # each calling thread's CUDA stream

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._threads, "stream", None)
        if stream is None:
            stream = self._threads.stream = torch.cuda.Stream(self.device)
        return stream

    def __call__(self, stacked: Mapping[str, torch.Tensor], backend: str, activation: str,
                 input_scale_policy: str, *, quantize: str | None = None,
                 activation_scales: Mapping[str, torch.Tensor] | None = None, **options: object) -> PreparedLayer:
        def run(tensors: Mapping[str, torch.Tensor]) -> PreparedLayer:
            if quantize:
                return prepare_quantized(tensors, quantize, activation_scales, backend, activation,
                                         input_scale_policy, **options)
            return prepare(tensors, backend, activation, input_scale_policy, **options)

        if self.device.type == "cpu":
            return run(stacked)
        stream = self._stream()
        with torch.cuda.stream(stream):
            on_device = {name: tensor.to(self.device, non_blocking=True) for name, tensor in stacked.items()}
            prepared = run(on_device)
            host = {name: _to_pinned(tensor) for name, tensor in prepared.tensors.items()}
        stream.synchronize()
        return PreparedLayer(host, prepared.layout)
