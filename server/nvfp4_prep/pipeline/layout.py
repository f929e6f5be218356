"""The sizes each backend pads a layer to, and the layout record that tags every prepared layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvfp4_prep.contract.layout import (
    EPILOGUE_TILE_M,
    FLASHINFER_LAYOUT_VERSION,
    PIPELINE_VERSION,
    SF_VEC_SIZE,
    layout_id,
)


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


@dataclass(frozen=True)
class LayerDims:
    """Logical sizes of one MoE layer and the padded sizes a backend needs."""

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


def padded_dims(backend: str, num_experts: int, hidden: int, intermediate: int, gated: bool) -> LayerDims:
    """SPEC P9 and the CUTLASS non-gated padding: the sizes each backend writes."""
    hidden_padded, intermediate_padded = hidden, intermediate
    if backend == "flashinfer_trtllm":
        hidden_padded = round_up(hidden, 256)
        intermediate_padded = round_up(intermediate, 64 if gated else 128)
    elif backend in ("flashinfer_cutlass", "vllm_cutlass") and not gated:
        intermediate_padded = round_up(intermediate, 128)
    return LayerDims(num_experts, hidden, intermediate, gated, hidden_padded, intermediate_padded)


def layout_record(backend: str, activation: str, policy: str, dims: LayerDims) -> dict:
    """The JSON-serialisable record sent with, and stored beside, every prepared layer."""
    return {
        "layout_id": layout_id(backend),
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
