"""SPEC section 7 names -> where vLLM 0.33.0 keeps each on a FusedMoE layer and what FlashInfer's kernel gets.

The table holds for ``ModelOptNvFp4FusedMoE`` on the FlashInfer TRT-LLM backend, the only one whose post-load
step vLLM 0.33.0 runs in its "weights already processed" mode; the kernel is
``flashinfer.fused_moe.trtllm_fp4_block_scale_moe`` (``trtllm_fp4_block_scale_routed_moe`` for pre-routed
tokens). Placed tensors go onto the layer's parameters; the others vLLM's post-load step derives from them,
and the loader checks that it derived our values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """One prepared tensor: where vLLM keeps it, the kernel argument it becomes, and whether we place it."""

    name: str
    held_as: str
    kernel_arg: str
    placed: bool


SLOTS: tuple[Slot, ...] = (
    Slot("w13_weight", "layer.w13_weight", "gemm1_weights", True),
    Slot("w13_weight_scale", "layer.w13_weight_scale (= quant_config.w1_scale)", "gemm1_weights_scale", True),
    Slot("w13_weight_scale_2", "layer.w13_weight_scale_2 (= quant_config.g1_alphas, fused in place)",
         "output1_scale_gate_scalar", True),
    Slot("w13_input_scale", "layer.w13_input_scale", "none: quant_config.a1_gscale = 1 / it", True),
    Slot("w2_weight", "layer.w2_weight", "gemm2_weights", True),
    Slot("w2_weight_scale", "layer.w2_weight_scale (= quant_config.w2_scale)", "gemm2_weights_scale", True),
    Slot("w2_weight_scale_2", "layer.w2_weight_scale_2 (= quant_config.g2_alphas, fused in place)",
         "output2_scale_scalar", True),
    Slot("w2_input_scale", "layer.w2_input_scale", "none: quant_config.a2_gscale = 1 / it", True),
    Slot("g1_alphas", "quant_config.g1_alphas", "output1_scale_gate_scalar", False),
    Slot("g2_alphas", "quant_config.g2_alphas", "output2_scale_scalar", False),
    Slot("a1_gscale", "quant_config.a1_gscale",
         "hidden_states_scale (vLLM quantizes the hidden states to NVFP4 with this global scale)", False),
    Slot("a2_gscale", "quant_config.a2_gscale", "none: folded into g1_scale_c", False),
    Slot("g1_scale_c", "layer.g1_scale_c", "output1_scale_scalar", False),
)
PLACED = tuple(slot.name for slot in SLOTS if slot.placed)
DERIVED = tuple(slot.name for slot in SLOTS if not slot.placed)


def expected_tensors(experts: int, hidden_padded: int, inter_padded: int,
                     gated: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every prepared tensor of a rank's layer, as vLLM 0.33.0's TRT-LLM post-load leaves it.

    Weights and block scales are logical ``[E, N1p, Hp/2]``, ``[E, N1p, Hp/16]``, ``[E, Hp, Ip/2]``,
    ``[E, Hp, Ip/16]``; every scalar is per local expert (the input scales are the layer-wide max, repeated).
    """
    n1 = 2 * inter_padded if gated else inter_padded
    shapes = {
        "w13_weight": ((experts, n1, hidden_padded // 2), torch.uint8),
        "w13_weight_scale": ((experts, n1, hidden_padded // 16), torch.float8_e4m3fn),
        "w2_weight": ((experts, hidden_padded, inter_padded // 2), torch.uint8),
        "w2_weight_scale": ((experts, hidden_padded, inter_padded // 16), torch.float8_e4m3fn),
    }
    scalars = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale", *DERIVED)
    return {**shapes, **{name: ((experts,), torch.float32) for name in scalars}}
