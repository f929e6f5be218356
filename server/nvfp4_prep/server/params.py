"""The parameters of a Prepare header that change the prepared bytes, checked before anything else."""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, INPUT_SCALE_POLICIES, PIPELINE_VERSION, layout_id
from nvfp4_prep.v1 import prep_pb2 as pb

from .cache import CacheKey
from .errors import LayoutUnavailable, invalid


@dataclass(frozen=True)
class Params:
    backend: str
    activation: str
    policy: str
    layout_id: str

    def cache_key(self, source: str) -> CacheKey:
        """The cache key of this layout of the layer whose identity is ``source``."""
        return CacheKey(source, self.backend, self.activation, self.policy, self.layout_id, PIPELINE_VERSION)


def read_params(header: pb.PrepareHeader) -> Params:
    """The header's parameters, checked; a layout version this server cannot produce is LayoutUnavailable."""
    for field, value, choices in (("header.backend", header.backend, BACKENDS),
                                  ("header.activation", header.activation, ACTIVATIONS),
                                  ("header.input_scale_policy", header.input_scale_policy, INPUT_SCALE_POLICIES)):
        if value not in choices:
            raise invalid(field, f"is {value!r}", "one of " + ", ".join(choices))
    produced = layout_id(header.backend)
    if header.layout_version and header.layout_version != produced:
        raise LayoutUnavailable(
            f"header.layout_version: this server produces {produced!r} for {header.backend}, "
            f"not {header.layout_version!r}", "header.layout_version")
    return Params(header.backend, header.activation, header.input_scale_policy, produced)
