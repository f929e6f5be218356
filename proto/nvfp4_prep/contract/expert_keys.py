"""The per-expert tensor names of SPEC section 2, relative to a layer's experts prefix: ``<e>.<proj>.<leaf>``.

``3.up_proj.weight`` (Qwen-MoE, DeepSeek) or ``3.w3.weight_packed`` (Mixtral names). The expert index is a
decimal number and the projection one of six names; the grammar has no nested repetition, so matching is
linear in the name's length. Indices and names are bounded (``MAX_EXPERT_INDEX``, ``MAX_KEY_CHARS``): a name
beyond them is bad input, named in a ``PrepError``, not an integer too long to convert.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import PrepError

# Checkpoint projection names and the role each plays in the stacked layer.
PROJECTION_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}

# Far more experts than any model has (what a uint32 holds: an index this large still fails as a gap in the
# experts, before anything is allocated for them), and far longer names than any checkpoint uses.
MAX_EXPERT_INDEX = 2**32 - 1
MAX_KEY_CHARS = 1024
# How much of a rejected name an error shows.
_SHOWN_CHARS = 64

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
    """The parts of a per-expert tensor name, or None when ``name`` is not one; PrepError (naming the tensor)
    when its expert index or its length is beyond the bounds."""
    match = _KEY.fullmatch(name)
    if match is not None and (len(match[1]) > len(str(MAX_EXPERT_INDEX)) or int(match[1]) > MAX_EXPERT_INDEX):
        raise PrepError(shown(name), f"has an expert index of {len(match[1])} digits ({shown(match[1], 16)})",
                        f"an expert index from 0 to {MAX_EXPERT_INDEX}")
    if len(name) > MAX_KEY_CHARS:
        raise PrepError(shown(name), f"is a tensor name of {len(name)} characters",
                        f"a per-expert tensor name of at most {MAX_KEY_CHARS} characters")
    return ExpertKey(int(match[1]), match[2], match[3]) if match else None


def shown(name: str, limit: int = _SHOWN_CHARS) -> str:
    """``name`` cut to ``limit`` characters for an error message, saying how long it was."""
    return name if len(name) <= limit else f"{name[:limit]}...({len(name)} characters)"


def looks_per_expert(name: str) -> bool:
    """Whether ``name`` starts with an expert index, which is what tells the per-expert form from the stacked one
    (the stacked names, ``w13_weight`` ..., never do)."""
    return _INDEXED.match(name) is not None
