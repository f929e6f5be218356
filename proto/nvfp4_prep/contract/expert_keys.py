"""The per-expert tensor names of SPEC section 2, relative to a layer's experts prefix: ``<e>.<proj>.<leaf>``.

``3.up_proj.weight`` (Qwen-MoE, DeepSeek) or ``3.w3.weight_packed`` (Mixtral names). The expert index is a
decimal number and the projection one of six names; the grammar has no nested repetition, so matching is
linear in the name's length.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Checkpoint projection names and the role each plays in the stacked layer.
PROJECTION_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}

_INDEX = r"(\d+)\."
_KEY = re.compile(_INDEX + r"(" + "|".join(PROJECTION_ROLES) + r")\.([a-z_0-9]+)")
_INDEXED = re.compile(_INDEX)


class ExpertKey(NamedTuple):
    """One parsed per-expert name: ``expert`` index, checkpoint ``projection`` name, tensor ``leaf``."""

    expert: int
    projection: str
    leaf: str

    @property
    def role(self) -> str:
        """``gate``, ``up`` or ``down``."""
        return PROJECTION_ROLES[self.projection]


def parse_expert_key(name: str) -> ExpertKey | None:
    """The parts of a per-expert tensor name, or None when ``name`` is not one."""
    match = _KEY.fullmatch(name)
    return ExpertKey(int(match[1]), match[2], match[3]) if match else None


def looks_per_expert(name: str) -> bool:
    """Whether ``name`` starts with an expert index, which is what tells the per-expert form from the stacked one
    (the stacked names, ``w13_weight`` ..., never do)."""
    return _INDEXED.match(name) is not None
