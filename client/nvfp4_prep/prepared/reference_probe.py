"""Whether a server reads this checkpoint itself, so that ``prepare --server`` can send references.

A server reads checkpoints only under its ``--allowed-root``s, and where it does, the path may name other
files than this machine's (shared storage mounted elsewhere, a stale copy). File identities cannot be
compared across machines (device and inode differ), so the probe compares bytes, cheaply: the server
prepares one expert of the first layer by reference (an expert-parallel shard of one expert, of which it
reads only that expert and the layer's input scales) and this process prepares the same shard from its own
files; the two must be byte-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from nvfp4_prep.checkpoint.checkpoint import Checkpoint
from nvfp4_prep.client.errors import PrepInvalidArgument, PrepNotFound, PrepPermissionDenied
from nvfp4_prep.client.sdk import PrepClient

log = logging.getLogger(__name__)

# The server's checkpoint errors name this field (server.status): a location it cannot read as a checkpoint.
REF_FIELD = "header.ref"


def probe_shard(checkpoint: Checkpoint, prefix: str) -> dict:
    """The shard keywords of the probe: expert 0 of ``prefix`` alone."""
    return {"ep_rank": 0, "ep_size": checkpoint.layer(prefix).num_experts, "expert_placement": "linear"}


def why_not_references(client: PrepClient, location: str, checkpoint: Checkpoint, backend: str, activation: str,
                       input_scale_policy: str, options: Mapping[str, object]) -> str | None:
    """None when the server reads ``checkpoint`` at ``location`` (the probe's bytes agree), else why it cannot.

    A refusal (PERMISSION_DENIED: no ``--allowed-root``, or a path outside them; NOT_FOUND: no such file or
    layer; INVALID_ARGUMENT on ``header.ref``: no valid checkpoint there) is a reason; any other error is
    raised, since uploading would meet it too.
    """
    from nvfp4_prep.pipeline import prepare
    from nvfp4_prep.pipeline.shard import Shard

    prefix = checkpoint.moe_layers()[0]
    shard = probe_shard(checkpoint, prefix)
    try:
        answer = client.prepare_reference(location, prefix, backend, activation, input_scale_policy, **options,
                                          **shard)
    except (PrepPermissionDenied, PrepNotFound) as err:
        return err.details
    except PrepInvalidArgument as err:
        if err.field != REF_FIELD:
            raise
        return err.details
    local = prepare(checkpoint.read_layer(prefix, activation, shard=Shard(**shard)), backend, activation,
                    input_scale_policy, **options, **shard, inputs="shard")
    differing = [name for name, tensor in local.tensors.items() if not _same_bytes(answer.tensors.get(name), tensor)]
    if differing:
        return (f"its files at {location} differ from {checkpoint.directory}: expert 0 of {prefix} prepares "
                f"to other bytes ({', '.join(differing)})")
    log.debug("%s reads %s as %s: expert 0 of %s agrees", client.target, checkpoint.directory, location, prefix)
    return None


def _same_bytes(got: torch.Tensor | None, want: torch.Tensor) -> bool:
    return got is not None and (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)) and torch.equal(
        got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
