"""The parameters of a Prepare header that change the prepared bytes, checked before anything else.

proto3 cannot tell an omitted field from its zero value, so each omitted field means its documented default
(grpcurl users send such headers): an empty activation is "swiglu", an empty policy "max", an empty profile
"seed", a gated group size of 0 is 64 and an unset shard is the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4_prep.contract.layout import (
    BACKENDS,
    DEFAULT_GATED_GROUP_SIZE,
    DEFAULT_PROFILE,
    EXPERT_PLACEMENTS,
    GATED_GROUP_SIZES,
    INPUT_SCALE_POLICIES,
    PIPELINE_VERSION,
    PROFILES,
    backend_activations,
    layout_id,
)
from nvfp4_prep.v1 import prep_pb2 as pb

from .cache import CacheKey
from .errors import LayoutUnavailable, invalid


@dataclass(frozen=True)
class Params:
    backend: str
    activation: str
    policy: str
    layout_id: str
    profile: str = DEFAULT_PROFILE
    gated_group_size: int = DEFAULT_GATED_GROUP_SIZE
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    expert_placement: str = "linear"

    def cache_key(self, source: str) -> CacheKey:
        """The cache key of this layout of the layer whose identity is ``source`` (the layout id names the
        profile, release, options and shard)."""
        return CacheKey(source, self.backend, self.activation, self.policy, self.layout_id, PIPELINE_VERSION)

    def options(self) -> dict:
        """The keyword arguments of ``nvfp4_prep.pipeline.prepare`` beyond backend, activation and policy."""
        return {"profile": self.profile, "gated_group_size": self.gated_group_size, "tp_rank": self.tp_rank,
                "tp_size": self.tp_size, "ep_rank": self.ep_rank, "ep_size": self.ep_size,
                "expert_placement": self.expert_placement}


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise invalid(field, f"is {value!r}", "one of " + ", ".join(choices))


def _shard(shard: pb.RankShard) -> dict:
    values = {"tp_rank": shard.tp_rank, "tp_size": shard.tp_size or 1, "ep_rank": shard.ep_rank,
              "ep_size": shard.ep_size or 1, "expert_placement": shard.expert_placement or "linear"}
    _choice("header.shard.expert_placement", values["expert_placement"], EXPERT_PLACEMENTS)
    for kind in ("tp", "ep"):
        if values[f"{kind}_rank"] >= values[f"{kind}_size"]:
            raise invalid(f"header.shard.{kind}_rank", f"is {values[f'{kind}_rank']}",
                          f"below {kind}_size ({values[f'{kind}_size']})")
    return values


def read_params(header: pb.PrepareHeader) -> Params:
    """The header's parameters, checked; a profile or layout version this server cannot produce is
    LayoutUnavailable (FAILED_PRECONDITION)."""
    _choice("header.backend", header.backend, BACKENDS)
    profile = header.profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise LayoutUnavailable(f"header.profile: this server produces the profiles {', '.join(PROFILES)}, "
                                f"not {profile!r}", "header.profile")
    activation = header.activation or "swiglu"
    _choice("header.activation", activation, backend_activations(profile, header.backend))
    policy = header.input_scale_policy or "max"
    _choice("header.input_scale_policy", policy, INPUT_SCALE_POLICIES)
    group = header.gated_group_size or DEFAULT_GATED_GROUP_SIZE
    if group not in GATED_GROUP_SIZES:
        raise invalid("header.gated_group_size", f"is {group}", "64 or 16 (0 means 64)")
    shard = _shard(header.shard)
    produced = layout_id(header.backend, profile=profile, activation=activation, policy=policy,
                         gated_group_size=group, **shard)
    if header.layout_version and header.layout_version != produced:
        raise LayoutUnavailable(
            f"header.layout_version: this server produces {produced!r} for this request, "
            f"not {header.layout_version!r}", "header.layout_version")
    return Params(header.backend, activation, policy, produced, profile, group, **shard)
