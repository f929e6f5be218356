"""A layer preparer that runs the pipeline in this process: ``prepare`` without ``--server``.

No loopback server, no serialisation: the layer read from the checkpoint goes to the device (a CUDA
GPU when there is one, else the CPU), through ``nvfp4_prep.pipeline.prepare`` and back to host memory
for the writer. The prepare job already keeps two layers in flight per preparer, so reading and writing
one layer overlap with preparing the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.pipeline import PreparedLayer, prepare, prepare_quantized


def default_device() -> torch.device:
    """The first CUDA device when torch sees one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class InProcessPreparer:
    """``(stacked, backend, activation, policy, **options) -> PreparedLayer`` on ``device``, in host memory.

    With ``quantize`` (a recipe) the tensors are high-precision weights, quantized on the device with
    ``activation_scales`` and prepared in the same pass (``pipeline.prepare_quantized``), as a server does."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()

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
        on_device = {name: tensor.to(self.device, non_blocking=True) for name, tensor in stacked.items()}
        prepared = run(on_device)
        host = {name: tensor.to("cpu") for name, tensor in prepared.tensors.items()}
        return PreparedLayer(host, prepared.layout)
