"""What is checked before any prepared byte lands on a vLLM layer: engine version, layout record, tensors.

Pure comparisons of plain values (no vLLM import): ``layer_state`` reads them off vLLM's layer. Every refusal
is a ``PreparedLoadRefused`` naming the field, what the layer expects and what the prepared layer has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.layout import flashinfer_release

from .params import expected_tensors

PROFILE = "vllm-0.33"
VLLM_RELEASE = "0.33.0"
BACKEND = "flashinfer_trtllm"  # the one backend vLLM 0.33.0 takes pre-processed NVFP4 MoE weights for
INPUT_SCALE_POLICIES = ("max", "strict")  # vLLM reduces with max; strict equals it wherever it passes


class PreparedLoadRefused(ValueError):
    """The prepared layers cannot go onto this vLLM model as they are; ``field`` names what differs."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_vllm_version(version: str) -> None:
    """Only the vLLM release a profile was made for takes its bytes (SPEC section 10)."""
    if version != VLLM_RELEASE:
        raise PreparedLoadRefused(
            "vllm version", f"no profile for vLLM {version}: the {PROFILE} profile holds the bytes vLLM "
            f"{VLLM_RELEASE}'s own post-load step leaves; load the source checkpoint with vLLM's default loader")


def no_pre_processed_mode(method_name: str, supports: object, compressed_tensors: bool) -> str:
    """Why vLLM 0.33.0's MoE method ``method_name`` cannot take prepared bytes, and what vLLM would need (the
    loader says it per layer; the ``nvfp4_prep`` quantization config for a compressed-tensors source)."""
    hint = " (a compressed-tensors NVFP4 checkpoint)" if compressed_tensors else ""
    return (f"vLLM 0.33.0's {method_name}{hint} has no 'weights already processed' mode "
            f"(supports_pre_processed_weights is {supports}), so vLLM would prepare the prepared bytes again; vLLM "
            "would need that mode in this method, as ModelOptNvFp4FusedMoE has it for FLASHINFER_TRTLLM. Prepare a "
            "ModelOpt NVFP4 checkpoint for flashinfer_trtllm, or load this one with vLLM's default loader")


@dataclass(frozen=True)
class Expectation:
    """What one vLLM layer on this rank needs, read from vLLM's own layer and parallel state."""

    prefix: str
    activation: str
    experts: int
    global_experts: int
    expert_ids: tuple[int, ...]
    hidden: int
    intermediate: int
    hidden_padded: int
    intermediate_padded: int
    gated: bool
    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int
    expert_placement: str

    def shard(self) -> dict:
        """The shard keywords of ``pipeline.prepare`` and of the prepared-folder reader."""
        return {"tp_rank": self.tp_rank, "tp_size": self.tp_size, "ep_rank": self.ep_rank, "ep_size": self.ep_size,
                "expert_placement": self.expert_placement}

    def record(self) -> dict:
        """The layout-record fields this layer needs, with the values it needs."""
        return {
            "profile": PROFILE, "backend": BACKEND, "activation": self.activation,
            "flashinfer_release": flashinfer_release(PROFILE), **self.shard(),
            "num_experts": self.experts, "global_num_experts": self.global_experts,
            "expert_ids": list(self.expert_ids),
            "hidden_dim_unpadded": self.hidden, "intermediate_dim_unpadded": self.intermediate,
            "hidden_dim": self.hidden_padded, "intermediate_dim": self.intermediate_padded,
        }


def check_layout(layout: Mapping, expected: Expectation) -> None:
    """The layer's layout record against what vLLM's layer on this rank needs."""
    for field, want in expected.record().items():
        have = layout.get(field)
        if have != want:
            raise PreparedLoadRefused(
                f"{expected.prefix}: layout record {field}", f"this vLLM layer needs {want!r}, the prepared layer "
                f"has {have!r}")
    policy = layout.get("input_scale_policy")
    if policy not in INPUT_SCALE_POLICIES:
        raise PreparedLoadRefused(f"{expected.prefix}: layout record input_scale_policy",
                                  f"expected one of {', '.join(INPUT_SCALE_POLICIES)}, got {policy!r}")


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Expectation) -> None:
    """Names, shapes and dtypes of the prepared tensors against those vLLM's post-load step would leave."""
    want = expected_tensors(expected.experts, expected.hidden_padded, expected.intermediate_padded, expected.gated)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise PreparedLoadRefused(f"{expected.prefix}: tensors",
                                  f"expected SPEC section 7 names; missing {missing}, unexpected {extra}")
    for name, (shape, dtype) in want.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise PreparedLoadRefused(
                f"{expected.prefix}.{name}", f"this vLLM layer needs {list(shape)} {dtype}, the prepared tensor "
                f"is {list(tensor.shape)} {tensor.dtype}")
