"""Runs a GatherPlan: one pass over the bytes, into a preallocated output."""

from __future__ import annotations

import torch

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.tensor_bytes import dense

from . import triton_gather
from .plan import GatherPlan

# "torch" forces the portable path on CUDA too (benchmarks and GPU tests compare both).
_KERNEL = env_value("gather", "auto")


def _words(tensor: torch.Tensor, plan: GatherPlan, rows: int, cols: int) -> torch.Tensor:
    experts = tensor.shape[0]
    # dense(), not contiguous(): with E = 1 a contiguous tensor may still carry an odd stride there.
    return dense(tensor).view(torch.uint8).view(experts, -1).view(plan.word).view(experts, rows, cols)


def apply(plan: GatherPlan, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the prepared bytes of ``source`` ([E, ...], any byte dtype) into ``out``.

    On CUDA a Triton kernel gathers every output word once (``triton_gather``). The torch path
    scatters each input word once to its destination (the maps are
    injective), then zeroes only the padding. Neither makes an intermediate
    copy of the tensor.
    """
    src_map, inverse, padding = plan.maps(source.device)
    src = _words(source, plan, plan.in_rows, plan.in_cols)
    dst = _words(out, plan, plan.out_rows, plan.out_cols)
    if _KERNEL != "torch" and triton_gather.available(source):
        triton_gather.gather(plan, src_map, src, dst)
        return out
    data = dst if plan.out_cols == plan.in_cols else dst.narrow(2, 0, plan.in_cols)
    data.index_copy_(1, inverse, src)
    if padding.numel():
        dst.index_fill_(1, padding, 0)
    if plan.out_cols > plan.in_cols:
        dst.narrow(2, plan.in_cols, plan.out_cols - plan.in_cols).zero_()
    return out


def invert(plan: GatherPlan, prepared: torch.Tensor) -> torch.Tensor:
    """The source bytes back from prepared ones, as a ``[E, in_rows * in_cols]`` word tensor."""
    _, inverse, _ = plan.maps(prepared.device)
    dst = _words(prepared, plan, plan.out_rows, plan.out_cols)
    data = dst if plan.out_cols == plan.in_cols else dst.narrow(2, 0, plan.in_cols)
    return torch.index_select(data, 1, inverse)


def padding_is_zero(plan: GatherPlan, prepared: torch.Tensor) -> bool:
    """Whether every padding byte of ``prepared`` is 0x00, as SPEC section 1 requires."""
    _, _, padding = plan.maps(prepared.device)
    dst = _words(prepared, plan, plan.out_rows, plan.out_cols)
    if padding.numel() and bool(torch.index_select(dst, 1, padding).any()):
        return False
    if plan.out_cols > plan.in_cols:
        return not bool(dst.narrow(2, plan.in_cols, plan.out_cols - plan.in_cols).any())
    return True
