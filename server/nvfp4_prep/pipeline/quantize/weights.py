"""High-precision expert weights in, as the stacked W13 / W2 pair: the stacked form or per-expert HF names.

Stacked: ``w13_weight`` ``[E, N1, H]`` and ``w2_weight`` ``[E, H, I]``. Per expert: ``<e>.<proj>.weight``
(``gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``), stacked ``[gate; up]`` as ``assemble_layer``
does (interleaved for ``swigluoai``). Weights must be bfloat16, float16 or float32, all one dtype on one
device; NaN and infinities are found later, per block, by the quantizer (``BlockNames`` names them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.errors import PrepError
from nvfp4_prep.contract.expert_keys import looks_per_expert, parse_expert_key
from nvfp4_prep.contract.layout import ALL_ACTIVATIONS, GATED_ACTIVATIONS, INTERLEAVED_ACTIVATIONS

from ..assemble import check_expert_indices
from ..validate import check_choice
from .recipes import BLOCK

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STACKED_WEIGHTS = ("w13_weight", "w2_weight")


@dataclass
class ExpertWeights:
    """The stacked pair, and how its rows map back to the caller's tensor names."""

    w13: torch.Tensor
    w2: torch.Tensor
    gated: bool
    interleaved: bool
    # Roles of the W13 projections then "down": (gate, up, down), or (up, down) / (gate, down) when not gated.
    roles: tuple[str, ...]
    # Checkpoint projection names of those roles in the per-expert form; None when stacked.
    projections: tuple[str, ...] | None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def w13_name(self, expert: int, row: int) -> str:
        """The caller's name for W13 row ``row`` of ``expert``."""
        if self.projections is None:
            return f"w13_weight (expert {expert})"
        if not self.gated:
            return f"{expert}.{self.projections[0]}.weight"
        half = self.w13.shape[1] // 2
        first = row % 2 == 0 if self.interleaved else row < half
        return f"{expert}.{self.projections[0 if first else 1]}.weight"

    def w2_name(self, expert: int) -> str:
        if self.projections is None:
            return f"w2_weight (expert {expert})"
        return f"{expert}.{self.projections[-1]}.weight"


def _check_tensor(name: str, tensor: object, like: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise PrepError(name, f"is a {type(tensor).__name__}", "a torch.Tensor")
    if tensor.dtype not in WEIGHT_DTYPES:
        raise PrepError(name, f"has dtype {str(tensor.dtype).removeprefix('torch.')}",
                        "bfloat16, float16 or float32 weights to quantize")
    if like is not None and (tensor.dtype != like.dtype or tensor.device != like.device):
        raise PrepError(name, f"is {tensor.dtype} on {tensor.device}", f"{like.dtype} on {like.device} like the others")
    return tensor


def _check_shapes(w13: torch.Tensor, w2: torch.Tensor, gated: bool, w13_name: str, w2_name: str) -> None:
    if w13.dim() != 3 or w2.dim() != 3:
        raise PrepError(w13_name if w13.dim() != 3 else w2_name, "is not 3-D", "[E, N1, H] and [E, H, I]")
    experts, n1, hidden = w13.shape
    inter = n1 // 2 if gated else n1
    if experts == 0:
        raise PrepError(w13_name, "has no experts", "E >= 1")
    if gated and n1 % 2:
        raise PrepError(w13_name, f"has N1 = {n1} rows", "an even N1 = 2I for a gated activation")
    if tuple(w2.shape) != (experts, hidden, inter):
        raise PrepError(w2_name, f"has shape {list(w2.shape)}", f"{[experts, hidden, inter]} to match {w13_name}")
    for dim, value in (("H", hidden), ("I", inter)):
        if value == 0 or value % BLOCK:
            raise PrepError(w13_name if dim == "H" else w2_name, f"has {dim} = {value}",
                            f"{dim} a positive multiple of {BLOCK} (one block scale per {BLOCK} values)")


def _per_expert(weights: Mapping[str, torch.Tensor], activation: str) -> ExpertWeights:
    experts: dict[int, dict[str, torch.Tensor]] = {}
    names: dict[str, str] = {}
    like = None
    for key, tensor in weights.items():
        parsed = parse_expert_key(key)
        if parsed is None or parsed.leaf != "weight":
            raise PrepError(key, "is not a per-expert weight name",
                            "'<expert>.<gate_proj|up_proj|down_proj|w1|w3|w2>.weight'")
        like = _check_tensor(key, tensor, like)
        role = parsed.role
        if role in experts.setdefault(parsed.expert, {}):
            raise PrepError(key, f"gives expert {parsed.expert}'s {role} projection a second time",
                            "one weight per projection")
        experts[parsed.expert][role] = tensor
        names.setdefault(role, parsed.projection)
    if not experts:
        raise PrepError("weights", "no expert weights were given", "w13_weight and w2_weight, or per-expert weights")
    count = check_expert_indices(experts)
    gated = activation in GATED_ACTIVATIONS
    roles = ("gate", "up") if gated else (("up",) if "up" in names else ("gate",))
    for e in range(count):
        for role in (*roles, "down"):
            if role not in experts[e]:
                proj = names.get(role, {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[role])
                raise PrepError(f"{e}.{proj}.weight", "is missing", f"{', '.join((*roles, 'down'))} weights of "
                                "every expert" + (" for a gated activation" if gated else ""))
        extra = set(experts[e]) - {*roles, "down"}
        if extra:
            raise PrepError(f"{e}.{names[extra.pop()]}.weight", f"is given for non-gated activation {activation!r}",
                            "only the up (or gate) and down weights")
    first = experts[0][roles[0]]
    for e in range(count):
        for role in (*roles, "down"):
            want = tuple(experts[0][role].shape)
            if tuple(experts[e][role].shape) != want or experts[e][role].dim() != 2:
                raise PrepError(f"{e}.{names[role]}.weight", f"has shape {list(experts[e][role].shape)}",
                                f"{list(want)} like expert 0 (2-D)")
    if gated and experts[0]["gate"].shape != experts[0]["up"].shape:
        raise PrepError(f"0.{names['up']}.weight", f"has shape {list(experts[0]['up'].shape)}",
                        f"{list(experts[0]['gate'].shape)} like the gate weight")
    interleaved = activation in INTERLEAVED_ACTIVATIONS
    rows = first.shape[0] * len(roles)
    w13 = torch.empty((count, rows, first.shape[1]), dtype=first.dtype, device=first.device)
    for e in range(count):
        for j, role in enumerate(roles):
            if interleaved:
                w13[e, j::len(roles)] = experts[e][role]
            else:
                w13[e, j * first.shape[0]:(j + 1) * first.shape[0]] = experts[e][role]
    w2 = torch.stack([experts[e]["down"] for e in range(count)])
    projections = tuple(names[role] for role in (*roles, "down"))
    _check_shapes(w13, w2, gated, f"0.{projections[0]}.weight", f"0.{projections[-1]}.weight")
    return ExpertWeights(w13, w2, gated, interleaved, (*roles, "down"), projections)


def expert_weights(weights: Mapping[str, torch.Tensor], activation: str = "swiglu") -> ExpertWeights:
    """The checked stacked pair of the stacked or per-expert weights (see the module docstring)."""
    check_choice("activation", activation, ALL_ACTIVATIONS)
    if any(looks_per_expert(name) for name in weights):
        return _per_expert(weights, activation)
    unknown = sorted(set(weights) - set(STACKED_WEIGHTS))
    if unknown:
        raise PrepError(unknown[0], "is not a weight to quantize", "w13_weight and w2_weight, or per-expert weights")
    for name in STACKED_WEIGHTS:
        if name not in weights:
            raise PrepError(name, "is missing", "w13_weight [E, N1, H] and w2_weight [E, H, I]")
    w13 = _check_tensor("w13_weight", weights["w13_weight"], None)
    w2 = _check_tensor("w2_weight", weights["w2_weight"], w13)
    gated = activation in GATED_ACTIVATIONS
    _check_shapes(w13, w2, gated, "w13_weight", "w2_weight")
    roles = ("gate", "up", "down") if gated else ("up", "down")
    return ExpertWeights(w13, w2, gated, activation in INTERLEAVED_ACTIVATIONS, roles, None)
