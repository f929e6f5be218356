"""The sizes each backend pads a layer to, and the layout record that tags every prepared layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.layout import (
    EPILOGUE_TILE_M,
    FLASHINFER_LAYOUT_VERSION,
    PADDING_FILL_BYTE,
    PIPELINE_VERSION,
    SF_VEC_SIZE,
    flashinfer_release,
    layout_id,
)

from .shard import Shard


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


@dataclass(frozen=True)
class LayerDims:
    """Logical sizes of one MoE layer (or rank shard) and the padded sizes a backend needs."""

    num_experts: int
    hidden: int
    intermediate: int
    gated: bool
    hidden_padded: int
    intermediate_padded: int

    @property
    def n1(self) -> int:
        return 2 * self.intermediate if self.gated else self.intermediate

    @property
    def n1_padded(self) -> int:
        return 2 * self.intermediate_padded if self.gated else self.intermediate_padded


def paddings(backend: str, gated: bool, profile: str = "seed") -> tuple[int | None, int | None]:
    """The multiples (H, I) a backend pads to, None where it pads nothing (SPEC P9 and section 10).

    TRT-LLM pads both in every profile; vLLM 0.33.0 pads CuteDSL the same way; the CUTLASS backends pad a
    non-gated I to 128.
    """
    if backend == "flashinfer_trtllm" or (backend == "flashinfer_cutedsl" and profile == "vllm-0.33"):
        return 256, 64 if gated else 128
    if backend in ("flashinfer_cutlass", "vllm_cutlass") and not gated:
        return None, 128
    return None, None


def padded_dims(backend: str, num_experts: int, hidden: int, intermediate: int, gated: bool, *,
                profile: str = "seed") -> LayerDims:
    """The sizes ``backend`` writes under ``profile``."""
    hidden_multiple, inter_multiple = paddings(backend, gated, profile)
    hidden_padded = round_up(hidden, hidden_multiple) if hidden_multiple else hidden
    intermediate_padded = round_up(intermediate, inter_multiple) if inter_multiple else intermediate
    return LayerDims(num_experts, hidden, intermediate, gated, hidden_padded, intermediate_padded)


def engine_config(backend: str, profile: str, dims: LayerDims) -> dict | None:
    """What vLLM 0.33.0 leaves in its ``moe_config`` after preparing (None for the seed).

    CuteDSL and TRT-LLM record the padded sizes and the unpadded hidden size; the CUTLASS backends update
    neither (vLLM pads a non-gated CUTLASS layer without changing ``intermediate_size_per_partition``), and
    ``hidden_dim_unpadded`` keeps FusedMoEConfig's default, the hidden size (SPEC section 10 says "unset":
    vLLM 0.33.0's code, the contract, sets it).
    """
    if profile != "vllm-0.33":
        return None
    if backend in ("flashinfer_cutedsl", "flashinfer_trtllm"):
        return {"hidden_dim": dims.hidden_padded, "hidden_dim_unpadded": dims.hidden,
                "intermediate_size_per_partition": dims.intermediate_padded}
    return {"hidden_dim": dims.hidden, "hidden_dim_unpadded": dims.hidden,
            "intermediate_size_per_partition": dims.intermediate}


def layout_record(backend: str, activation: str, policy: str, dims: LayerDims, *, profile: str = "seed",
                  gated_group_size: int = 64, shard: Shard | None = None, expert_ids: tuple[int, ...] = (),
                  global_experts: int | None = None) -> dict:
    """The JSON-serialisable record sent with, and stored beside, every prepared layer (SPEC sections 7, 10, 11).

    Every key is always present (the wire's ``Layout`` message has one field for each); ``unprepare`` reads
    a key absent from an older record as its default.
    """
    shard = shard or Shard()
    record = {
        "layout_id": layout_id(backend, profile=profile, activation=activation, policy=policy,
                               gated_group_size=gated_group_size, tp_rank=shard.tp_rank, tp_size=shard.tp_size,
                               ep_rank=shard.ep_rank, ep_size=shard.ep_size,
                               expert_placement=shard.expert_placement),
        "backend": backend,
        "activation": activation,
        "input_scale_policy": policy,
        "pipeline_version": PIPELINE_VERSION,
        "flashinfer_layout_version": FLASHINFER_LAYOUT_VERSION,
        "epilogue_tile_m": EPILOGUE_TILE_M,
        "sf_vec_size": SF_VEC_SIZE,
        "num_experts": dims.num_experts,
        "hidden_dim": dims.hidden_padded,
        "hidden_dim_unpadded": dims.hidden,
        "intermediate_dim": dims.intermediate_padded,
        "intermediate_dim_unpadded": dims.intermediate,
    }
    hidden_multiple, inter_multiple = paddings(backend, dims.gated, profile)
    record.update({
        "profile": profile,
        "flashinfer_release": flashinfer_release(profile, gated_group_size),
        "gated_group_size": gated_group_size,
        "padding_fill_byte": PADDING_FILL_BYTE,
        "hidden_alignment": hidden_multiple or 1,  # 1: not padded
        "intermediate_alignment": inter_multiple or 1,
        "tp_rank": shard.tp_rank,
        "tp_size": shard.tp_size,
        "ep_rank": shard.ep_rank,
        "ep_size": shard.ep_size,
        "expert_placement": shard.expert_placement,
        "global_num_experts": global_experts if global_experts is not None else dims.num_experts,
        "expert_ids": list(expert_ids) if expert_ids else list(range(dims.num_experts)),
    })
    record["engine_config"] = engine_config(backend, profile, dims)
    return record


def quantized_record(record: dict, recipe: str, source_dtype: torch.dtype) -> dict:
    """``record`` of a layer quantized by ``recipe`` from ``source_dtype`` weights before it was prepared: the same
    record (the bytes, and so the layout id, are those of preparing the recipe's tool's checkpoint) with
    ``quantize_recipe`` and ``quantized_from`` (the dtype's torch name, e.g. ``"bfloat16"``) added."""
    return {**record, "quantize_recipe": recipe, "quantized_from": str(source_dtype).removeprefix("torch.")}
