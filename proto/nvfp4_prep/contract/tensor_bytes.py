"""A tensor's bytes as a flat uint8 CPU tensor: what is checksummed, framed and written."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Where each tensor of a packed layer starts (a server's CUDA IPC export, a client's device landing): a multiple
# of what cudaMalloc aligns an allocation to, so that every view is as aligned as a tensor of its own would be.
PACKED_ALIGNMENT = 256


def row_major_strides(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The strides of a freshly allocated tensor of ``shape`` (1 on the last dimension)."""
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def packed_offsets(sizes: Sequence[int], alignment: int = PACKED_ALIGNMENT) -> tuple[list[int], int]:
    """The byte offset of each of ``sizes`` in one buffer, in order, each a multiple of ``alignment``; and the
    buffer's size (the last one's end). A layer packed the same way on both sides of a CUDA IPC hand-over
    moves in one copy."""
    offsets, end = [], 0
    for size in sizes:
        start = -(-end // alignment) * alignment
        offsets.append(start)
        end = start + size
    return offsets, end


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with row-major strides: itself where it has them, a copy otherwise.

    ``Tensor.contiguous()`` is not enough: torch counts a size-1 dimension (an expert count of
    one, ``t[:, 0]`` of a ``[1, 2]`` tensor, ``expand(1)``) as contiguous whatever its stride, so
    a later ``view`` to another dtype or shape can still refuse it. Every byte reinterpretation
    goes through this first.
    """
    if tensor.stride() == row_major_strides(tensor.shape):
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` in row-major order as a flat uint8 tensor on the CPU.

    A view where the tensor already is row-major on the CPU, a copy otherwise (including a
    tensor that torch calls contiguous but whose size-1 dimensions carry other strides).
    """
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = dense(flat).reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
