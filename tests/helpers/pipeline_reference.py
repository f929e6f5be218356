"""An independent formulation of every backend and profile, written the way vLLM runs it.

Plain torch ops (cat, pad, view/permute) and FlashInfer's own pure-torch
helpers, expert by expert: slow and memory-hungry on purpose, and sharing no
code with nvfp4_prep.pipeline. The tests compare the pipeline's bytes with it.
Profile ``vllm-0.33`` follows vLLM 0.33.0's ``prepare_nvfp4_moe_layer_for_flashinfer_cutedsl`` and
``prepare_nvfp4_moe_layer_for_fi_or_cutlass`` step by step (SPEC section 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

GATED = {"swiglu": True, "swigluoai": True, "swigluoai_uninterleave": True, "relu2": False}


def ceil_to(x: int, m: int) -> int:
    return math.ceil(x / m) * m


def swizzle(scale: torch.Tensor) -> torch.Tensor:
    """SPEC P4 by its 'equivalently' clause: pad, view, permute."""
    experts, rows, cols = scale.shape
    rows_p, cols_p = ceil_to(rows, 128), ceil_to(cols, 4)
    padded = F.pad(scale, (0, cols_p - cols, 0, rows_p - rows))
    tiles = padded.view(experts, rows_p // 128, 4, 32, cols_p // 4, 4)
    return tiles.permute(0, 1, 4, 3, 2, 5).contiguous().view(experts, rows_p, cols_p)


def to_up_gate(w: torch.Tensor, activation: str) -> torch.Tensor:
    """[gate; up] (or gpt-oss interleaved rows) -> [up; gate]."""
    if activation == "swigluoai":
        pairs = w.view(w.shape[0], w.shape[1] // 2, 2, *w.shape[2:])
        return torch.cat([pairs[:, :, 1], pairs[:, :, 0]], dim=1)
    half = w.shape[1] // 2
    return torch.cat([w[:, half:], w[:, :half]], dim=1)


def swap(w: torch.Tensor) -> torch.Tensor:
    """vLLM's reorder_w1w3_to_w3w1: the two row halves exchanged, whatever the rows hold."""
    half = w.shape[1] // 2
    return torch.cat([w[:, half:], w[:, :half]], dim=1)


def to_gate_up(w: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swigluoai":
        pairs = w.view(w.shape[0], w.shape[1] // 2, 2, *w.shape[2:])
        return torch.cat([pairs[:, :, 0], pairs[:, :, 1]], dim=1)
    return w


def interleave_groups(x: torch.Tensor, group: int = 64) -> torch.Tensor:
    """CuteDSL: groups of 64 rows alternately from the two halves (view/transpose form)."""
    experts, rows = x.shape[:2]
    rest = x.shape[2:]
    split = x.view(experts, 2, rows // (2 * group), group, *rest)
    return split.transpose(1, 2).contiguous().view(experts, rows, *rest)


def pad_halves(x: torch.Tensor, inter: int, inter_p: int) -> torch.Tensor:
    up, gate = x[:, :inter], x[:, inter:]
    return torch.cat([F.pad(up, (0, 0, 0, inter_p - inter)), F.pad(gate, (0, 0, 0, inter_p - inter))], dim=1)


def expected_scalars(layer: dict, backend: str, activation: str, profile: str = "seed") -> dict[str, torch.Tensor]:
    """SPEC sections 2, 4 and 6 for policy 'max', formula by formula; vLLM 0.33.0 fuses ws * a in place."""
    experts = layer["w2_weight"].shape[0]
    ws13 = layer["w13_weight_scale_2"]
    ws13 = ws13[:, 0] if ws13.dim() == 2 else ws13
    a13, a2, ws2 = layer["w13_input_scale"], layer["w2_input_scale"], layer["w2_weight_scale_2"]
    if backend == "vllm_cutlass":
        a13p = torch.maximum(a13[:, 0], a13[:, 1]) if a13.dim() == 2 else a13.clone()
        a2p = a2.clone()
    else:
        a13p = torch.full((experts,), float(a13.max()), dtype=torch.float32)
        a2p = torch.full((experts,), float(a2.max()), dtype=torch.float32)
    g1 = ws13 * a13p
    g2 = ws2 * a2p
    a1g = 1.0 / a13p
    a2g = 1.0 / a2p
    fused = profile == "vllm-0.33"
    return {
        "w13_weight_scale_2": ws13 * a13p if fused else ws13, "w13_input_scale": a13p,
        "w2_weight_scale_2": ws2 * a2p if fused else ws2, "w2_input_scale": a2p,
        "g1_alphas": g1, "g2_alphas": g2, "a1_gscale": a1g, "a2_gscale": a2g,
        "g1_scale_c": g1 * a2g if GATED[activation] else a2g,
    }


def pad_hidden(w13, s13, w2, s2, hidden: int, hidden_p: int) -> tuple[torch.Tensor, ...]:
    """vLLM's align_fp4_moe_hidden_dim_for_fi: W13/S13 columns and W2/S2 rows to ``hidden_p``, zero-filled."""
    return (F.pad(w13, (0, (hidden_p - hidden) // 2)), F.pad(s13, (0, (hidden_p - hidden) // 16)),
            F.pad(w2, (0, 0, 0, hidden_p - hidden)), F.pad(s2, (0, 0, 0, hidden_p - hidden)))


def pad_intermediate(w13, s13, w2, s2, inter: int, inter_p: int, gated: bool) -> tuple[torch.Tensor, ...]:
    """vLLM's align_fp4_moe_weights_for_fi: each GEMM1 half and W2/S2 columns to ``inter_p``."""
    if gated:
        w13, s13 = pad_halves(w13, inter, inter_p), pad_halves(s13, inter, inter_p)
    else:
        w13, s13 = F.pad(w13, (0, 0, 0, inter_p - inter)), F.pad(s13, (0, 0, 0, inter_p - inter))
    return w13, s13, F.pad(w2, (0, (inter_p - inter) // 2)), F.pad(s2, (0, (inter_p - inter) // 16))


def vllm_cutedsl(w13, s13, w2, s2, activation: str) -> tuple[torch.Tensor, ...]:
    """prepare_nvfp4_moe_layer_for_flashinfer_cutedsl: reorder, pad I then H, interleave by 64, swizzle."""
    gated = GATED[activation]
    hidden, inter = 2 * w13.shape[2], 2 * w2.shape[2]
    if gated:
        w13, s13 = to_up_gate(w13, activation), to_up_gate(s13, activation)
    w13, s13, w2, s2 = pad_intermediate(w13, s13, w2, s2, inter, ceil_to(inter, 64 if gated else 128), gated)
    w13, s13, w2, s2 = pad_hidden(w13, s13, w2, s2, hidden, ceil_to(hidden, 256))
    if gated:
        w13, s13 = interleave_groups(w13), interleave_groups(s13)
    return w13, swizzle(s13), w2, swizzle(s2)


def reference_prepare(layer: dict, backend: str, activation: str, profile: str = "seed",
                      group: int = 64) -> dict[str, torch.Tensor]:
    """All SPEC section 7 tensors, as uint8 for weights and scales; ``group`` is the CuteDSL row group."""
    gated = GATED[activation]
    w13, s13 = layer["w13_weight"], layer["w13_weight_scale"].view(torch.uint8)
    w2, s2 = layer["w2_weight"], layer["w2_weight_scale"].view(torch.uint8)
    experts, n1, half_h = w13.shape
    hidden = 2 * half_h
    inter = n1 // 2 if gated else n1

    if backend == "flashinfer_cutedsl" and profile == "vllm-0.33":
        out13, outs13, out2, outs2 = vllm_cutedsl(w13, s13, w2, s2, activation)
    elif backend == "flashinfer_cutedsl":
        if gated:
            w13 = interleave_groups(to_up_gate(w13, activation), group)
            s13 = interleave_groups(to_up_gate(s13, activation), group)
        out13, outs13, out2, outs2 = w13, swizzle(s13), w2, swizzle(s2)
    elif backend in ("flashinfer_cutlass", "vllm_cutlass"):
        if gated and profile == "vllm-0.33":
            # vLLM 0.33.0 swaps the halves for FlashInfer CUTLASS and keeps vLLM CUTLASS rows, interleaved or not.
            if backend == "flashinfer_cutlass":
                w13, s13 = swap(w13), swap(s13)
        elif gated:
            order = to_up_gate if backend == "flashinfer_cutlass" else to_gate_up
            w13, s13 = order(w13, activation), order(s13, activation)
        else:
            inter_p = ceil_to(inter, 128)
            w13 = F.pad(w13, (0, 0, 0, inter_p - inter))
            s13 = F.pad(s13, (0, 0, 0, inter_p - inter))
            w2 = F.pad(w2, (0, (inter_p - inter) // 2))
            s2 = F.pad(s2, (0, (inter_p - inter) // 16))
        out13, outs13, out2, outs2 = w13, swizzle(s13), w2, swizzle(s2)
    else:  # flashinfer_trtllm, with FlashInfer's own permutation helpers
        hidden_p = ceil_to(hidden, 256)
        inter_p = ceil_to(inter, 64 if gated else 128)
        if gated:
            w13, s13 = to_up_gate(w13, activation), to_up_gate(s13, activation)
            w13, s13 = pad_halves(w13, inter, inter_p), pad_halves(s13, inter, inter_p)
        else:
            w13, s13 = F.pad(w13, (0, 0, 0, inter_p - inter)), F.pad(s13, (0, 0, 0, inter_p - inter))
        w13 = F.pad(w13, (0, (hidden_p - hidden) // 2))
        s13 = F.pad(s13, (0, (hidden_p - hidden) // 16))
        w2 = F.pad(w2, (0, (inter_p - inter) // 2, 0, hidden_p - hidden))
        s2 = F.pad(s2, (0, (inter_p - inter) // 16, 0, hidden_p - hidden))
        cache: dict = {}
        out13, outs13, out2, outs2 = [], [], [], []
        for e in range(experts):
            p13 = _maybe_get_cached_w3_w1_permute_indices(cache, w13[e], 128, is_gated_act_gemm=gated)
            p13s = _maybe_get_cached_w3_w1_permute_indices(cache, s13[e], 128, num_elts_per_sf=16,
                                                            is_gated_act_gemm=gated)
            p2 = get_w2_permute_indices_with_cache(cache, w2[e], 128)
            p2s = get_w2_permute_indices_with_cache(cache, s2[e], 128, num_elts_per_sf=16)
            out13.append(w13[e][p13])
            outs13.append(s13[e][p13s])
            out2.append(w2[e][p2])
            outs2.append(s2[e][p2s])
        out13, out2 = torch.stack(out13), torch.stack(out2)
        outs13, outs2 = swizzle(torch.stack(outs13)), swizzle(torch.stack(outs2))
    result = {"w13_weight": out13, "w13_weight_scale": outs13, "w2_weight": out2, "w2_weight_scale": outs2}
    result.update(expected_scalars(layer, backend, activation, profile))
    return result


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``want`` in ``got`` with its shape and bytes (floats bit for bit)."""
    def raw(tensor: torch.Tensor) -> torch.Tensor:
        return as_bytes(tensor.new_empty(tensor.shape).copy_(tensor)).view(torch.uint8)

    for name, expected in want.items():
        assert tuple(got[name].shape) == tuple(expected.shape), name
        assert torch.equal(raw(got[name]), raw(expected)), name
