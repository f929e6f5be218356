"""The parameters of a Prepare header that change the prepared bytes, checked before anything else.

proto3 cannot tell an omitted field from its zero value, so each omitted field means its documented default
(grpcurl users send such headers): an empty activation is "swiglu", an empty policy "max", an empty profile
"seed", a gated group size of 0 is 64, an unset shard is the whole layer, streamed whole
(``inputs_are_shard`` false), an empty ``quantize`` means the source is NVFP4 already, and an unset ``delivery``
streams the answer.
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
    QUANTIZE_RECIPES,
    backend_activations,
    layout_id,
)
from nvfp4_prep.pipeline.shard import Shard
from nvfp4_prep.v1 import prep_pb2 as pb

from .cache import CacheKey
from .errors import LayoutUnavailable, invalid

# header.delivery's values, by the names the server logs.
STREAM, CUDA_IPC = "stream", "cuda_ipc"
DELIVERIES = {pb.DELIVERY_STREAM: STREAM, pb.DELIVERY_CUDA_IPC: CUDA_IPC}
MAX_NODE_ID_CHARS = 512
MAX_TOKEN_CHARS = 64  # a GPU's UUID ("GPU-" and 36 characters) or a process token, with room


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
    # What the source gives the pipeline: "layer" (the whole layer) or "shard" (the rank's input shard: streamed
    # with ``inputs_are_shard``, or read by the server from a checkpoint reference with a shard).
    inputs: str = "layer"
    # The recipe that quantizes a high-precision source first (``header.quantize``); empty: the source is NVFP4.
    quantize: str = ""
    # How the answer travels (``header.delivery``), the client's node, process and GPU for CUDA
    # IPC; none changes its bytes.
    delivery: str = STREAM
    node_id: str = ""
    ipc_device_uuid: str = ""
    process_id: str = ""

    @property
    def shard(self) -> Shard:
        return Shard(self.tp_rank, self.tp_size, self.ep_rank, self.ep_size, self.expert_placement)

    def cache_key(self, source: str) -> CacheKey:
        """The cache key of this layout of the layer whose identity is ``source`` (the layout id names the
        profile, release, options and shard; the same streamed bytes cut differently as an input shard)."""
        if self.inputs == "shard":
            source = f"{source}|inputs=shard"
        if self.quantize:  # the same weights quantized by another recipe give other bytes
            source = f"{source}|quantize={self.quantize}"
        return CacheKey(source, self.backend, self.activation, self.policy, self.layout_id, PIPELINE_VERSION)

    def options(self) -> dict:
        """The keyword arguments of ``nvfp4_prep.pipeline.prepare`` beyond backend, activation and policy."""
        return {"profile": self.profile, "gated_group_size": self.gated_group_size, "tp_rank": self.tp_rank,
                "tp_size": self.tp_size, "ep_rank": self.ep_rank, "ep_size": self.ep_size,
                "expert_placement": self.expert_placement, "inputs": self.inputs}


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


def _inputs(header: pb.PrepareHeader, shard: dict) -> str:
    """"shard" when the source gives the rank's input shard (SPEC section 11), else "layer"."""
    source = header.WhichOneof("source")
    if header.quantize:
        if header.shard.inputs_are_shard:
            raise invalid("header.shard.inputs_are_shard", "is true with header.quantize",
                          "false: the whole high-precision layer, which the server quantizes (an expert's global "
                          "scale is over all its rows) before it cuts the rank's shard")
        return "layer"  # read or received whole, quantized, then cut by prepare
    if header.shard.inputs_are_shard:
        if source == "ref":
            raise invalid("header.shard.inputs_are_shard", "is true for a checkpoint reference",
                          "false: the server reads the rank's bytes of a referenced layer itself")
        if header.tensors.form == pb.TENSOR_FORM_PER_EXPERT:
            raise invalid("header.shard.inputs_are_shard", "is true for TENSOR_FORM_PER_EXPERT tensors",
                          "TENSOR_FORM_STACKED: an input shard is sent stacked, with the input scales of every "
                          "expert of the layer")
        return "shard"
    whole = shard["tp_size"] == 1 and shard["ep_size"] == 1
    return "shard" if source == "ref" and not whole else "layer"


def _delivery(header: pb.PrepareHeader) -> dict[str, str]:
    """The delivery fields of ``Params``: "stream", or "cuda_ipc" with the client's node id and process
    (``nvfp4_prep.contract.node``) and perhaps the UUID of the GPU it lands on."""
    if header.delivery not in DELIVERIES:
        raise invalid("header.delivery", f"is {header.delivery}", "DELIVERY_STREAM (0) or DELIVERY_CUDA_IPC (1)")
    delivery = DELIVERIES[header.delivery]
    if len(header.node_id) > MAX_NODE_ID_CHARS:
        raise invalid("header.node_id", f"is {len(header.node_id)} characters long",
                      f"at most {MAX_NODE_ID_CHARS}: a boot id, '/' and a hostname")
    if delivery == CUDA_IPC and not header.node_id:
        raise invalid("header.node_id", "is empty with DELIVERY_CUDA_IPC",
                      "the client's node: its boot id, '/' and its hostname (nvfp4_prep.contract.node)")
    if header.ipc_destinations and not header.ipc_device_uuid:
        raise invalid("header.ipc_destinations", "is set without header.ipc_device_uuid",
                      "empty, or the GPU of the tensors it names in header.ipc_device_uuid")
    for field in ("node_id", "ipc_device_uuid", "process_id", "ipc_destinations"):
        if delivery == STREAM and getattr(header, field):
            raise invalid(f"header.{field}", "is set without DELIVERY_CUDA_IPC",
                          "empty, or header.delivery DELIVERY_CUDA_IPC")
    for field, what in (("ipc_device_uuid", "a GPU's UUID as torch.cuda.get_device_properties gives it"),
                        ("process_id", "a token naming the client's process")):
        if len(getattr(header, field)) > MAX_TOKEN_CHARS:
            raise invalid(f"header.{field}", f"is {len(getattr(header, field))} characters long",
                          f"at most {MAX_TOKEN_CHARS}: {what}")
    return {"delivery": delivery, "node_id": header.node_id, "ipc_device_uuid": header.ipc_device_uuid,
            "process_id": header.process_id}


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
    if header.quantize:
        _choice("header.quantize", header.quantize, QUANTIZE_RECIPES)
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
    return Params(header.backend, activation, policy, produced, profile, group, **shard,
                  inputs=_inputs(header, shard), quantize=header.quantize, **_delivery(header))
