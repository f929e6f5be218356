"""vLLM 0.33.0's own NVFP4 MoE weight preparation, run on CPU: the reference for the ``vllm-0.33`` profile.

Runs inside ``.venv-vllm`` (built by ``.ci/env-vllm``), never in the main environment. For each job it builds
vLLM's own ``FusedMoEConfig``, ``ModelOptNvFp4Config`` and ``ModelOptNvFp4FusedMoE`` (whose constructor selects
the backend and its experts class, as ``--moe-backend`` does), lets ``create_weights`` register the layer's
parameters on a minimal ``torch.nn.Module``, copies the stacked input into them (what vLLM's weight loader
leaves there), and calls ``ModelOptNvFp4FusedMoE.process_weights_after_loading`` itself: the oracle's
conversion, the quant config and the experts' own post-load step (which fuses the input scales into
``w*_weight_scale_2`` and, for TRT-LLM, registers ``g1_scale_c``). Every parameter the layer ends with is
written out, with the quant config's ``g1_alphas``, ``g2_alphas``, ``a1_gscale`` and ``a2_gscale`` and the
config's sizes; where vLLM raises, its message is reported instead. No SwiGLU clamp/alpha/beta is set: those
add kernel parameters, not bytes. One process serves many jobs, so vLLM (a slow import) is imported once:

    python -m tests.reference.vllm_moe REPLY_FD

reads one JSON job per line on stdin and answers each with one JSON line on file descriptor ``REPLY_FD``:

- ``{"kind": "prepare", "input": IN, "output": OUT, "backend": B, "activation": A}``: ``IN`` is a safetensors
  file of the stacked layer (SPEC section 2 names, no prefix; per-expert scales ``[E]`` or ``[E, 2]``).
  Answer ``{"attrs": {...}}`` with the tensors in ``OUT``, or ``{"refused": "vLLM's message"}``.
- ``{"kind": "swizzle", "input": IN, "output": OUT}``: vLLM's own ``swizzle_blockscale`` and
  ``stand_ins.p4_interleave`` of every tensor in ``IN`` (names ``NAME.vllm`` and ``NAME.p4`` in ``OUT``), so that
  the test can cross-check replacement 4 against vLLM's code. Answer ``{"attrs": {}}``.
- a fault of the harness itself answers ``{"error": traceback}``.

Only calls that need a GPU or CUDA-only code are replaced, each by its CPU equivalent; nothing else of vLLM's
or FlashInfer's is touched (``tests/pipeline/test_vllm_reference.py`` cross-checks the replacements):

1. The platform's device queries. vLLM is imported as on any GPU-less machine (its CUDA platform module loads
   ``libcuda`` on import); while a job runs, the platform class reports CUDA and compute capability 10.0
   (B200, the GPU all four backends run on). vLLM's own checks then run as on that GPU: the experts'
   ``is_supported_config`` (activation, quant scheme) and ``FusedMoEConfig``'s refusal of non-gated MoE on
   non-CUDA platforms.
2. ``_supports_current_device`` of the four experts classes also asks whether FlashInfer's compiled kernels
   are usable (cubins or nvcc), which a CPU machine never has; it is replaced by the capability part of the
   same check.
3. ``torch.Tensor.cuda`` returns the tensor itself while a job runs: vLLM's pure-torch ``swizzle_blockscale``
   ends in ``.contiguous().cuda()``.
4. ``flashinfer.nvfp4_block_scale_interleave`` (a JIT-compiled CUDA module; FlashInfer has no host version)
   is SPEC P4 by its offset formula (``stand_ins.p4_interleave``), for the TRT-LLM shuffle's scale tiling.
5. ``nvfp4_swizzled_scale_to_cutedsl_mma_view``: FlashInfer's ``convert_sf_to_mma_layout`` lives in
   ``flashinfer.cute_dsl.utils``, which imports the CUDA-only CUTLASS DSL; replaced by SPEC P8
   (``stand_ins.p8_view``), the same view/permute. It only builds the CuteDSL kernel's view of the scales;
   the layer keeps the P4 bytes, which are what is written out (the view's shape and strides are attrs).
6. ``torch.accelerator.current_device_index`` returns 0 when there is no accelerator (the TRT-LLM experts
   ask it for the device of their optional per-expert clamp tensors).

vLLM's tensor-parallel group is real: one gloo rank of size 1 (its parameters read their TP rank from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import flashinfer
import torch
from safetensors.torch import load_file, save_file
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.experts.cutlass_moe import CutlassExpertsFp4
from vllm.model_executor.layers.fused_moe.experts.flashinfer_cutedsl_moe import FlashInferCuteDSLExperts
from vllm.model_executor.layers.fused_moe.experts.flashinfer_cutlass_moe import FlashInferExperts
from vllm.model_executor.layers.fused_moe.experts.trtllm_nvfp4_moe import TrtLlmNvFp4ExpertsBase
from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config, ModelOptNvFp4FusedMoE
from vllm.model_executor.layers.quantization.utils import flashinfer_fp4_moe
from vllm.model_executor.layers.quantization.utils.nvfp4_utils import swizzle_blockscale
from vllm.platforms import current_platform
from vllm.platforms.interface import DeviceCapability, PlatformEnum

from tests.reference.stand_ins import p4_interleave, p8_view

# Our names -> vLLM 0.33.0's (`--moe-backend` values; activations as the models pass them to FusedMoE).
BACKENDS = {
    "flashinfer_cutedsl": "flashinfer_cutedsl",
    "flashinfer_cutlass": "flashinfer_cutlass",
    "flashinfer_trtllm": "flashinfer_trtllm",
    "vllm_cutlass": "cutlass",
}
# relu2: Nemotron-H passes activation_without_mul("relu2") = "relu2_no_mul" (non-gated, N1 = I).
ACTIVATIONS = {
    "swiglu": "silu",
    "swigluoai": "swigluoai",
    "swigluoai_uninterleave": "swigluoai_uninterleave",
    "relu2": "relu2_no_mul",
}
# How vLLM refuses a combination (backend selection, alignment checks, asserts in its helpers).
REFUSALS = (ValueError, NotImplementedError, AssertionError, RuntimeError)

# Replacement 2: the capability part of each class's own _supports_current_device.
_DEVICE_CHECKS = {
    TrtLlmNvFp4ExpertsBase: lambda: current_platform.is_device_capability_family(100),
    FlashInferExperts: lambda: current_platform.is_device_capability(90)
    or current_platform.is_device_capability_family(100)
    or current_platform.is_device_capability_family(120),
    FlashInferCuteDSLExperts: lambda: current_platform.is_device_capability_family(100),
    CutlassExpertsFp4: lambda: current_platform.is_device_capability_family(100)
    or current_platform.is_device_capability_family(110)
    or current_platform.is_device_capability_family(120),
}
for _cls, _check in _DEVICE_CHECKS.items():
    _cls._supports_current_device = staticmethod(_check)


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """Replacements 1 and 3 to 6, for the duration of one job."""
    platform = type(current_platform)
    replaced = [
        (platform, "_enum", PlatformEnum.CUDA),
        (platform, "get_device_capability", classmethod(lambda cls, device_id=0: DeviceCapability(10, 0))),
        (torch.Tensor, "cuda", lambda self, *args, **kwargs: self),
        (flashinfer, "nvfp4_block_scale_interleave", p4_interleave),
        (oracle, "nvfp4_swizzled_scale_to_cutedsl_mma_view", p8_view),
        (flashinfer_fp4_moe, "nvfp4_swizzled_scale_to_cutedsl_mma_view", p8_view),
    ]
    if not torch.accelerator.is_available():
        replaced.append((torch.accelerator, "current_device_index", lambda: 0))
    # What each owner itself holds (None: inherited, so deleting the replacement restores it).
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in replaced]
    for owner, name, value in replaced:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


class MinimalLayer(torch.nn.Module):
    """What ModelOptNvFp4FusedMoE reads from its RoutedExperts layer: parameters, moe_config, activation."""

    def __init__(self, moe_config: FusedMoEConfig) -> None:
        super().__init__()
        self.moe_config = moe_config
        self.activation = moe_config.activation

    def _expert_routing_tables(self) -> None:
        return None  # no expert parallelism, no routing tables


class Refused(Exception):
    """vLLM raised while selecting the backend or preparing the weights: it does not run this combination."""


def _refusal(error: BaseException) -> Refused:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/vllm/" in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return Refused(f"{type(error).__name__}: {error}{where}")


def _moe_config(tensors: dict[str, torch.Tensor], backend: str, activation: str) -> FusedMoEConfig:
    experts, hidden, packed_inter = tensors["w2_weight"].shape
    return FusedMoEConfig(
        num_experts=experts,
        experts_per_token=min(2, experts),
        hidden_dim=hidden,
        intermediate_size=packed_inter * 2,
        num_local_experts=experts,
        num_logical_experts=experts,
        activation=MoEActivation.from_str(ACTIVATIONS[activation]),
        device="cpu",
        routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16,
        moe_backend=BACKENDS[backend],
    )


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """What the weight loader leaves: each tensor in its parameter; an ``[E]`` scale fills every shard column."""
    for name, param in layer.named_parameters():
        source = tensors[name]
        if source.dim() == 1 and param.dim() == 2:
            source = source.unsqueeze(1).expand(param.shape)
        param.data.copy_(source.view(param.dtype) if source.dtype != param.dtype else source)


def prepare(tensors: dict[str, torch.Tensor], backend: str, activation: str) -> tuple[dict, dict]:
    """One layer through vLLM 0.33.0: (tensors the layer ends with, sizes); Refused where vLLM raises."""
    moe = _moe_config(tensors, backend, activation)
    quant = ModelOptNvFp4Config(quant_method="NVFP4", is_checkpoint_nvfp4_serialized=True, group_size=16)
    try:
        method = ModelOptNvFp4FusedMoE(quant, moe)
    except REFUSALS as error:
        raise _refusal(error) from error
    layer = MinimalLayer(moe)
    method.create_weights(layer, moe.num_experts, moe.hidden_dim, moe.intermediate_size_per_partition,
                          torch.bfloat16, weight_loader=None, global_num_experts=moe.num_experts)
    _load(layer, tensors)
    try:
        method.process_weights_after_loading(layer)
    except REFUSALS as error:
        raise _refusal(error) from error

    out = {name: param.detach().clone() for name, param in layer.named_parameters()}
    quant_config = method.moe_quant_config
    for name in ("g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale"):
        out[name] = getattr(quant_config, name).detach().clone()
    attrs = {
        "nvfp4_backend": method.nvfp4_backend.value,
        "experts_cls": type(method.moe_kernel.fused_experts).__name__,
        "activation": moe.activation.value,
        "is_act_and_mul": moe.is_act_and_mul,
        "hidden_dim": moe.hidden_dim,
        "hidden_dim_unpadded": moe.hidden_dim_unpadded,
        "intermediate_size_per_partition": moe.intermediate_size_per_partition,
        "intermediate_size_per_partition_unpadded": moe.intermediate_size_per_partition_unpadded,
    }
    for name, param in (("w1_scale", "w13_weight_scale"), ("w2_scale", "w2_weight_scale")):
        view = getattr(quant_config, name)
        attrs[f"{name}_view_shape"] = list(view.shape)
        attrs[f"{name}_view_stride"] = list(view.stride())
        attrs[f"{name}_view_aliases_layer"] = view.data_ptr() == getattr(layer, param).data_ptr()
    return out, attrs


def _swizzle(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, scale in tensors.items():
        out[f"{name}.vllm"] = swizzle_blockscale(scale).reshape(-1)
        out[f"{name}.p4"] = p4_interleave(scale)
    return out


def run_job(job: dict) -> dict:
    """One job (see the module docstring) to its answer."""
    tensors = load_file(job["input"])
    with cpu_stand_ins():
        if job["kind"] == "swizzle":
            out, attrs = _swizzle(tensors), {}
        else:
            try:
                out, attrs = prepare(tensors, job["backend"], job["activation"])
            except Refused as refusal:
                return {"refused": str(refusal)}
    save_file({name: t.contiguous() for name, t in out.items()}, job["output"])
    return {"attrs": attrs}


def serve(reply_fd: int) -> None:
    # One rank of tensor-parallel size 1, in a real (gloo) group.
    config = VllmConfig(device_config=DeviceConfig("cpu"))
    with tempfile.TemporaryDirectory() as scratch, set_current_vllm_config(config), \
            os.fdopen(reply_fd, "w") as replies:
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{scratch}/rendezvous")
        initialize_model_parallel(1, 1)
        for line in sys.stdin:
            try:
                answer = run_job(json.loads(line))
            except Exception:  # a fault of the harness: report it, keep serving
                answer = {"error": traceback.format_exc()}
            replies.write(json.dumps(answer) + "\n")
            replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
