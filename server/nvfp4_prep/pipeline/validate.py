"""SPEC section 8: every input check, each naming the field and what was expected."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.layout import (
    ALL_ACTIVATIONS,
    BACKENDS,
    GATED_ACTIVATIONS,
    GATED_GROUP_SIZES,
    INPUT_SCALE_POLICIES,
    PROFILES,
    STACKED_NAMES,
    backend_activations,
)

from .layout import LayerDims

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


def check_options(backend: str, activation: str, policy: str, profile: str, gated_group_size: int,
                  prefix: str = "") -> None:
    """The choices of a request, and their combinations that the profile's engine does not run."""
    check_choice(prefix + "backend", backend, BACKENDS)
    check_choice(prefix + "profile", profile, PROFILES)
    check_choice(prefix + "activation", activation, ALL_ACTIVATIONS)
    accepted = backend_activations(profile, backend)
    if activation not in accepted:
        raise PrepError(prefix + "activation", f"{activation!r} is not run by profile {profile!r} on {backend}",
                        "one of " + ", ".join(accepted))
    check_choice(prefix + "input_scale_policy", policy, INPUT_SCALE_POLICIES)
    if type(gated_group_size) is not int or gated_group_size not in GATED_GROUP_SIZES:
        raise PrepError(prefix + "gated_group_size", f"is {gated_group_size!r}",
                        " or ".join(map(str, GATED_GROUP_SIZES)))
    if gated_group_size != 64 and backend != "flashinfer_cutedsl":
        raise PrepError(prefix + "gated_group_size", f"is {gated_group_size} for backend {backend}",
                        "64 (other group sizes are a flashinfer_cutedsl option)")
    if gated_group_size != 64 and profile != "seed":
        raise PrepError(prefix + "gated_group_size", f"is {gated_group_size} with profile {profile!r}",
                        "64 (vLLM 0.33.0 groups CuteDSL rows by 64; FlashInfer 0.7.4's 16-row grouping needs "
                        "profile 'seed')")


def check_alignment(backend: str, dims: LayerDims, *, profile: str = "seed", gated_group_size: int = 64,
                    tp_size: int = 1) -> None:
    """The backend's alignment needs on the (rank's) sizes; ``tp_size`` is named when it made them fail."""
    inter = dims.intermediate
    cause = "tp_size" if tp_size > 1 else None
    if backend == "flashinfer_cutedsl" and dims.gated and profile == "seed":
        group = gated_group_size
        if dims.n1 % (2 * group):
            per_rank = f" per rank (tp_size = {tp_size})" if cause else ""
            raise PrepError(cause or "w2_weight", f"intermediate size I = {inter}{per_rank}",
                            f"I % {group} == 0 for flashinfer_cutedsl gated layers with gated_group_size {group}")
    if backend in ("flashinfer_cutlass", "vllm_cutlass") and dims.gated and dims.n1 % 128:
        per_rank = f" per rank (tp_size = {tp_size})" if cause else ""
        raise PrepError(cause or "w13_weight", f"N1 = {dims.n1} rows{per_rank}",
                        f"N1 % 128 == 0 for {backend} gated layers")


def validate(tensors: Mapping[str, torch.Tensor], backend: str, activation: str, policy: str, *,
             profile: str = "seed", gated_group_size: int = 64) -> LayerDims:
    """Check the options and a stacked layer; return the layer's dimensions, unpadded.

    The backend's paddings and alignment needs apply to what a rank holds: see ``check_alignment``.
    """
    check_options(backend, activation, policy, profile, gated_group_size)
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

    return LayerDims(experts, hidden, inter, gated, hidden, inter)
