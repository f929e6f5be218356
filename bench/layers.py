"""Random stacked NVFP4 layers of a given size, for the benchmarks."""

from __future__ import annotations

import torch


def random_layer(experts: int, hidden: int, inter: int, gated: bool = True, device: str = "cpu",
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A stacked layer (SPEC section 2) with random bytes and positive scales."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n1 = 2 * inter if gated else inter

    def u8(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)

    def e4m3(*shape: int) -> torch.Tensor:
        return torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=gen).to(device).view(torch.float8_e4m3fn)

    def scale(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=gen) + 0.5).to(device)

    def pair() -> torch.Tensor:
        """Gate and up share their scales, as in real checkpoints."""
        one = scale(experts)
        return torch.stack([one, one], dim=1) if gated else one

    return {
        "w13_weight": u8(experts, n1, hidden // 2),
        "w13_weight_scale": e4m3(experts, n1, hidden // 16),
        "w13_weight_scale_2": pair(),
        "w13_input_scale": pair(),
        "w2_weight": u8(experts, hidden, inter // 2),
        "w2_weight_scale": e4m3(experts, hidden, inter // 16),
        "w2_weight_scale_2": scale(experts),
        "w2_input_scale": scale(experts),
    }


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
