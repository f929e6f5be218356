"""Reads what a vLLM 0.33.0 FusedMoE layer needs (``Expectation``) off vLLM's own objects, and refuses the
quantization methods and backends whose post-load step has no "weights already processed" mode."""

from __future__ import annotations

import math

import torch
from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4 import (  # noqa: E501
    CompressedTensorsW4A4Nvfp4MoEMethod,
)
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE
from vllm.model_executor.layers.quantization.utils.flashinfer_utils import trtllm_nvfp4_hidden_alignment

from .checks import PROFILE, Expectation, PreparedLoadRefused, no_pre_processed_mode

# vLLM's MoEActivation values -> SPEC section 10's activation names (what the TRT-LLM profile prepares).
ACTIVATIONS = {"silu": "swiglu", "swigluoai_uninterleave": "swigluoai_uninterleave", "relu2_no_mul": "relu2"}
# prepare_nvfp4_moe_layer_for_fi_or_cutlass pads I to these for TRT-LLM (its min_alignment).
_INTER_ALIGNMENT = {True: 64, False: 128}


def is_nvfp4_moe(method: object) -> bool:
    """An NVFP4 MoE method: ours to place (ModelOpt) or to refuse (compressed-tensors)."""
    return isinstance(method, (ModelOptNvFp4FusedMoE, CompressedTensorsW4A4Nvfp4MoEMethod))


def check_method(method: object, prefix: str) -> None:
    """Refuse, naming what vLLM would need, every MoE method but ModelOpt NVFP4 W4A4 on FlashInfer TRT-LLM."""
    if not isinstance(method, ModelOptNvFp4FusedMoE):
        raise PreparedLoadRefused(f"{prefix}: quantization method", no_pre_processed_mode(
            type(method).__name__, getattr(method, "supports_pre_processed_weights", False),
            isinstance(method, CompressedTensorsW4A4Nvfp4MoEMethod)))
    if method.nvfp4_backend != NvFp4MoeBackend.FLASHINFER_TRTLLM:
        raise PreparedLoadRefused(
            f"{prefix}: MoE backend",
            f"vLLM selected {method.nvfp4_backend.value}; vLLM 0.33.0 accepts pre-processed NVFP4 MoE weights only "
            "on FLASHINFER_TRTLLM (ModelOptNvFp4FusedMoE.process_weights_after_loading raises for any other), so "
            f"vLLM would need a pre-processed path for {method.nvfp4_backend.value}. Run with --moe-backend "
            "flashinfer_trtllm (needs an SM100-family GPU), or use vLLM's default loader")
    if method.use_a16 or method.per_token_activation:
        kind = "W4A16" if method.use_a16 else "per-token NVFP4 activation"
        raise PreparedLoadRefused(f"{prefix}: activation quantization",
                                  f"{kind}: the {PROFILE} profile holds W4A4 layers with a global input scale")


def _expert_ids(layer: torch.nn.Module, global_experts: int, local_experts: int, prefix: str) -> tuple[int, ...]:
    """Global ids of the rank's experts in local-slot order, from vLLM's expert map (None: every expert)."""
    expert_map = getattr(layer, "_expert_map", None)
    if expert_map is None:
        return tuple(range(global_experts))
    slots = expert_map.detach().to("cpu")
    ids = tuple(int(e) for e in torch.nonzero(slots >= 0).reshape(-1))
    if [int(slots[e]) for e in ids] != list(range(local_experts)):
        raise PreparedLoadRefused(f"{prefix}: expert map",
                                  "vLLM's local slots are not the rank's experts in ascending global order")
    return ids


def expectation(layer: torch.nn.Module, method: ModelOptNvFp4FusedMoE, prefix: str) -> Expectation:
    """What ``layer`` (parameters as ``create_weights`` made them) needs on this rank."""
    check_method(method, prefix)
    moe = method.moe
    activation = ACTIVATIONS.get(moe.activation.value)
    if activation is None:
        raise PreparedLoadRefused(f"{prefix}: activation",
                                  f"no vllm-0.33 profile for vLLM activation {moe.activation.value!r}; "
                                  f"expected one of {', '.join(ACTIVATIONS)}")
    parallel = moe.moe_parallel_config
    if parallel.enable_eplb:
        raise PreparedLoadRefused(f"{prefix}: enable_eplb", "EPLB's redundant experts have no prepared shard")
    experts, hidden, packed_inter = layer.w2_weight.shape
    inter, gated = packed_inter * 2, moe.is_act_and_mul
    hidden_alignment = trtllm_nvfp4_hidden_alignment(per_token_activation=method.per_token_activation,
                                                     is_act_and_mul=gated)
    return Expectation(
        prefix=prefix, activation=activation, experts=experts, global_experts=moe.num_experts,
        expert_ids=_expert_ids(layer, moe.num_experts, experts, prefix), hidden=hidden, intermediate=inter,
        hidden_padded=math.ceil(hidden / hidden_alignment) * hidden_alignment,
        intermediate_padded=math.ceil(inter / _INTER_ALIGNMENT[gated]) * _INTER_ALIGNMENT[gated], gated=gated,
        tp_rank=parallel.tp_rank, tp_size=parallel.tp_size, ep_rank=parallel.ep_rank, ep_size=parallel.ep_size,
        expert_placement=getattr(layer, "expert_placement_strategy", "linear") or "linear",
    )
