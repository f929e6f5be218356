"""SPEC section 8: every input check, each naming the field and what was expected."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, GATED_ACTIVATIONS, INPUT_SCALE_POLICIES, STACKED_NAMES

from .layout import LayerDims, padded_dims

BLOCK_SCALE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrepError(field, f"unknown value {value!r}", "one of " + ", ".join(choices))


def _tensor(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise PrepError(name, "is missing", "all of " + ", ".join(STACKED_NAMES))
    value = tensors[name]
    if not isinstance(value, torch.Tensor):
        raise PrepError(name, f"is a {type(value).__name__}", "a torch.Tensor")
    return value


def _shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise PrepError(name, f"has shape {list(tensor.shape)}", f"{list(expected)} ({what})")


def _dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise PrepError(name, f"has dtype {str(tensor.dtype).removeprefix('torch.')}", names)


def _scale_values(name: str, tensor: torch.Tensor) -> None:
    _dtype(name, tensor, (torch.float32,))
    bad = ~torch.isfinite(tensor) | (tensor <= 0)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = float(tensor[index])
        raise PrepError(name, f"holds {value} at index {list(index)}", "finite values > 0")


def _global_scale(name: str, tensor: torch.Tensor, experts: int, pair_allowed: bool) -> None:
    shapes = [(experts,)] + ([(experts, 2)] if pair_allowed else [])
    if tuple(tensor.shape) not in shapes:
        raise PrepError(name, f"has shape {list(tensor.shape)}", " or ".join(str(list(s)) for s in shapes))
    _scale_values(name, tensor)


def _alignment(backend: str, dims: LayerDims) -> None:
    inter = dims.intermediate
    if backend == "flashinfer_cutedsl" and dims.gated and inter % 64:
        raise PrepError("w2_weight", f"intermediate size I = {inter}",
                        "I % 64 == 0 for flashinfer_cutedsl gated layers")
    if backend in ("flashinfer_cutlass", "vllm_cutlass") and dims.gated and dims.n1 % 128:
        raise PrepError("w13_weight", f"N1 = {dims.n1} rows", f"N1 % 128 == 0 for {backend} gated layers")


def validate(tensors: Mapping[str, torch.Tensor], backend: str, activation: str, policy: str) -> LayerDims:
    """Check a stacked layer and return its dimensions (padded for ``backend``)."""
    check_choice("backend", backend, BACKENDS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("input_scale_policy", policy, INPUT_SCALE_POLICIES)
    unknown = sorted(str(name) for name in tensors if name not in STACKED_NAMES)
    if unknown:
        raise PrepError(unknown[0], "is not a tensor of the stacked form",
                        "only " + ", ".join(STACKED_NAMES) + " (SPEC section 2)")
    gated = activation in GATED_ACTIVATIONS
    devices = {t.device for name in STACKED_NAMES if isinstance(t := tensors.get(name), torch.Tensor)}
    if len(devices) > 1:
        raise PrepError("tensors", f"live on devices {sorted(map(str, devices))}", "one device")

    w13 = _tensor(tensors, "w13_weight")
    _dtype("w13_weight", w13, (torch.uint8,))
    if w13.dim() != 3:
        raise PrepError("w13_weight", f"has {w13.dim()} dimensions", "3: [E, N1, H/2]")
    experts, n1, half_hidden = w13.shape
    if experts == 0:
        raise PrepError("w13_weight", "has E = 0 experts", "at least one expert")
    if gated and n1 % 2:
        raise PrepError("w13_weight", f"N1 = {n1} is odd", "an even N1 = 2 * I for a gated activation")
    hidden = 2 * half_hidden
    inter = n1 // 2 if gated else n1

    s13 = _tensor(tensors, "w13_weight_scale")
    _dtype("w13_weight_scale", s13, BLOCK_SCALE_DTYPES)
    if hidden % 16:
        raise PrepError("w13_weight", f"H = {hidden}", "H % 16 == 0 (one block scale per 16 values)")
    _shape("w13_weight_scale", s13, (experts, n1, hidden // 16), "[E, N1, H/16]")

    w2 = _tensor(tensors, "w2_weight")
    _dtype("w2_weight", w2, (torch.uint8,))
    _shape("w2_weight", w2, (experts, hidden, inter // 2), f"[E, H, I/2] with I = {inter} from w13_weight")
    if inter % 16:
        raise PrepError("w2_weight", f"I = {inter}", "I % 16 == 0 (one block scale per 16 values)")
    s2 = _tensor(tensors, "w2_weight_scale")
    _dtype("w2_weight_scale", s2, BLOCK_SCALE_DTYPES)
    _shape("w2_weight_scale", s2, (experts, hidden, inter // 16), "[E, H, I/16]")

    _global_scale("w13_weight_scale_2", _tensor(tensors, "w13_weight_scale_2"), experts, True)
    _global_scale("w13_input_scale", _tensor(tensors, "w13_input_scale"), experts, True)
    _global_scale("w2_weight_scale_2", _tensor(tensors, "w2_weight_scale_2"), experts, False)
    _global_scale("w2_input_scale", _tensor(tensors, "w2_input_scale"), experts, False)

    dims = padded_dims(backend, experts, hidden, inter, gated)
    _alignment(backend, dims)
    return dims
