"""Stacked test layers: random bytes, or rows tagged with their origin."""

from __future__ import annotations

import torch

GATE, UP, DOWN = 1, 2, 3


def random_layer(experts: int, hidden: int, inter: int, gated: bool = True, seed: int = 0,
                 shared_gate_up_scales: bool = True) -> dict[str, torch.Tensor]:
    """Random weights and block scales, positive global and input scales."""
    gen = torch.Generator().manual_seed(seed)
    n1 = 2 * inter if gated else inter

    def u8(*shape: int, high: int = 256) -> torch.Tensor:
        return torch.randint(0, high, shape, dtype=torch.uint8, generator=gen)

    def scale(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float32) + 0.25

    def first_scales() -> torch.Tensor:
        if not gated:
            return scale(experts)
        if shared_gate_up_scales:
            one = scale(experts)
            return torch.stack([one, one], dim=1)
        return scale(experts, 2)

    return {
        "w13_weight": u8(experts, n1, hidden // 2),
        "w13_weight_scale": u8(experts, n1, hidden // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w13_weight_scale_2": first_scales(),
        "w13_input_scale": first_scales(),
        "w2_weight": u8(experts, hidden, inter // 2),
        "w2_weight_scale": u8(experts, hidden, inter // 16, high=0x7F).view(torch.float8_e4m3fn),
        "w2_weight_scale_2": scale(experts),
        "w2_input_scale": scale(experts),
    }


def tag_rows(rows: int, cols: int, kind: int, expert: int) -> torch.Tensor:
    """Rows whose first bytes say (kind, row index, expert); kind 0 means padding."""
    out = torch.zeros(rows, cols, dtype=torch.uint8)
    index = torch.arange(rows)
    out[:, 0] = kind
    out[:, 1] = index % 256
    out[:, 2] = index // 256
    out[:, 3] = expert
    return out


def tagged_layer(experts: int, hidden: int, inter: int, activation: str = "swiglu") -> dict[str, torch.Tensor]:
    """A layer whose W13 rows name themselves: gate row i, up row i (interleaved for swigluoai)."""
    layer = random_layer(experts, hidden, inter, activation != "relu2")
    w13 = []
    for e in range(experts):
        if activation == "relu2":
            w13.append(tag_rows(inter, hidden // 2, UP, e))
            continue
        gate, up = tag_rows(inter, hidden // 2, GATE, e), tag_rows(inter, hidden // 2, UP, e)
        if activation == "swigluoai":
            w13.append(torch.stack([gate, up], dim=1).reshape(2 * inter, hidden // 2))
        else:
            w13.append(torch.cat([gate, up]))
    layer["w13_weight"] = torch.stack(w13)
    layer["w2_weight"] = torch.stack([tag_rows(hidden, inter // 2, DOWN, e) for e in range(experts)])
    return layer


def read_tags(weight: torch.Tensor) -> list[str]:
    """'g5', 'u12', 'd3' or '0' (padding) for each row of one expert's weight."""
    names = {0: "0", GATE: "g", UP: "u", DOWN: "d"}
    tags = []
    for row in weight:
        kind = int(row[0])
        tags.append("0" if kind == 0 else f"{names[kind]}{int(row[1]) + 256 * int(row[2])}")
    return tags
