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
    STACKED_SCALE_NAMES,
    backend_activations,
)

from .layout import LayerDims
from .shard import Shard

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


def _global_scale(name: str, tensor: torch.Tensor, experts: int, pair_allowed: bool) -> None:
    shapes = [(experts,)] + ([(experts, 2)] if pair_allowed else [])
    if tuple(tensor.shape) not in shapes:
        raise PrepError(name, f"has shape {list(tensor.shape)}", " or ".join(str(list(s)) for s in shapes))
    _dtype(name, tensor, (torch.float32,))


def host_scales(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The four per-expert scale tensors (checked by ``check_layer``) on the host, each checked finite and > 0.

    They are a few floats per expert: checking and reducing them on the host costs one wait for the device
    (on the first copy) instead of one per check, and ``prepare`` makes these copies after its gathers are
    queued, so that the wait overlaps them.
    """
    host = {}
    for name in STACKED_SCALE_NAMES:  # in the order their values are checked
        tensor = tensors[name].detach().cpu()
        bad = ~torch.isfinite(tensor) | (tensor <= 0)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise PrepError(name, f"holds {float(tensor[index])} at index {list(index)}", "finite values > 0")
        host[name] = tensor
    return host


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
             profile: str = "seed", gated_group_size: int = 64, shard: Shard | None = None) -> LayerDims:
    """Check the options and a stacked layer (or, with ``shard``, that rank's input shard: see ``check_layer``);
    return the dimensions of what the tensors hold, unpadded.

    The backend's paddings and alignment needs apply to what a rank holds: see ``check_alignment``.
    """
    check_options(backend, activation, policy, profile, gated_group_size)
    return check_layer(tensors, activation in GATED_ACTIVATIONS, shard)


def _held_experts(tensors: Mapping[str, torch.Tensor], shard: Shard) -> tuple[int, str]:
    """How many experts the rank's input shard holds, and the words that say why, from the layer's expert count
    (the length of ``w2_input_scale``, which an input shard carries for every expert of the layer)."""
    shard.check()
    a2 = _tensor(tensors, "w2_input_scale")
    if a2.dim() != 1 or a2.shape[0] == 0:
        raise PrepError("w2_input_scale", f"has shape {list(a2.shape)}",
                        "[E] with E >= 1: the input scales of every expert of the layer, which an input shard "
                        "carries (SPEC section 11)")
    ids = shard.expert_ids(a2.shape[0])
    why = (f"the {len(ids)} experts that ep_rank {shard.ep_rank} of ep_size {shard.ep_size} "
           f"({shard.expert_placement}) holds of the E = {a2.shape[0]} experts that w2_input_scale gives")
    return len(ids), why


def check_layer(tensors: Mapping[str, torch.Tensor], gated: bool, shard: Shard | None = None) -> LayerDims:
    """Check the names, dtypes, shapes and devices of a stacked layer's tensors; return its dimensions, unpadded.
    Nothing here reads tensor data (the values of the scales: ``host_scales``).

    With ``shard`` they are that rank's input shard (SPEC section 11): weights, block scales and global weight
    scales of the rank's experts only, its intermediate slice (``I`` is then the rank's ``I / tp_size``), and
    the input scales of every expert of the layer; ``num_experts`` is then the rank's count.
    """
    unknown = sorted(str(name) for name in tensors if name not in STACKED_NAMES)
    if unknown:
        raise PrepError(unknown[0], "is not a tensor of the stacked form",
                        "only " + ", ".join(STACKED_NAMES) + " (SPEC section 2)")
    devices = {t.device for name in STACKED_NAMES if isinstance(t := tensors.get(name), torch.Tensor)}
    if len(devices) > 1:
        raise PrepError("tensors", f"live on devices {sorted(map(str, devices))}", "one device")
    held, why = _held_experts(tensors, shard) if shard is not None else (None, "")

    w13 = _tensor(tensors, "w13_weight")
    _dtype("w13_weight", w13, (torch.uint8,))
    if w13.dim() != 3:
        raise PrepError("w13_weight", f"has {w13.dim()} dimensions", "3: [E, N1, H/2]")
    experts, n1, half_hidden = w13.shape
    if held is not None and experts != held:
        raise PrepError("w13_weight", f"has shape {list(w13.shape)}", f"[{held}, N1, H/2]: {why}")
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

    layer_experts = tensors["w2_input_scale"].shape[0] if held is not None else experts
    _global_scale("w13_weight_scale_2", _tensor(tensors, "w13_weight_scale_2"), experts, True)
    _global_scale("w13_input_scale", _tensor(tensors, "w13_input_scale"), layer_experts, True)
    _global_scale("w2_weight_scale_2", _tensor(tensors, "w2_weight_scale_2"), experts, False)
    _global_scale("w2_input_scale", _tensor(tensors, "w2_input_scale"), layer_experts, False)

    return LayerDims(experts, hidden, inter, gated, hidden, inter)
