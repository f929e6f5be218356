"""SPEC section 10: the GEMM1 row order each profile gives a gated layer before padding and interleaving.

The seed de-interleaves gpt-oss rows (``swigluoai``) for every backend. vLLM 0.33.0 does so only for CuteDSL
(``reorder_w13_to_w31_for_flashinfer_cutedsl``); FlashInfer CUTLASS swaps the halves of the still-interleaved
rows (``reorder_w1w3_to_w3w1``) and vLLM CUTLASS keeps them as loaded. ``swigluoai_uninterleave`` rows are
``[gate; up]`` like ``swiglu``.
"""

from __future__ import annotations

import torch

from nvfp4_prep.contract.layout import INTERLEAVED_ACTIVATIONS

from . import rowmaps


def gated_order(backend: str, activation: str, rows: int, profile: str = "seed") -> torch.Tensor:
    """Source row of each of the ``rows`` = 2I gated GEMM1 rows: ``[up; gate]``, or ``[gate; up]`` for vLLM CUTLASS."""
    if activation in INTERLEAVED_ACTIVATIONS and (profile == "seed" or backend == "flashinfer_cutedsl"):
        return rowmaps.deinterleave(rows, up_first=backend != "vllm_cutlass")
    if backend == "vllm_cutlass":
        return torch.arange(rows, dtype=torch.long)
    return rowmaps.swap_halves(rows)
