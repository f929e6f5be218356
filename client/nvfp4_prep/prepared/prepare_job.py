"""The prepare job: every MoE layer of a checkpoint through a layer preparer into a prepared checkpoint.

The preparer is a seam: any callable ``(stacked_tensors, backend, activation,
input_scale_policy) -> object with .tensors and .layout`` — the SDK's
``PrepClient.prepare_layer`` for a server, or ``nvfp4_prep.pipeline.prepare`` in
process. Each preparer works on two layers at a time, so reading and writing
overlap with preparing; with several preparers (one per server) each takes the
next pending layer as soon as it is free, so faster servers take more layers.
Progress goes to a callback, once per finished layer, so that the caller picks
how to show it (a bar on a terminal, a line per layer in a log).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from nvfp4_prep.checkpoint.checkpoint import Checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointInvalid

from .shard_plan import DEFAULT_MAX_SHARD_BYTES
from .writer import PreparedCheckpointWriter

log = logging.getLogger(__name__)

# Two layers per preparer at a time: one is read and written here while the other is prepared (four were
# no faster on the H200 machine, where writing with fsync bounds the job, and held twice the memory).
LAYERS_IN_FLIGHT_PER_PREPARER = 2


class PreparedLike(Protocol):
    tensors: Mapping[str, torch.Tensor]
    layout: dict


# (stacked, backend, activation, policy, profile=..., gated_group_size=...) -> prepared layer
LayerPreparer = Callable[..., PreparedLike]


@dataclass(frozen=True)
class LayerDone:
    """One layer written: which, and how far the run is (source bytes, layers kept from an earlier run included)."""

    prefix: str
    nbytes: int
    done_bytes: int
    total_bytes: int
    done_layers: int
    total_layers: int


@dataclass(frozen=True)
class PrepareSummary:
    """What a run did: layers prepared now, layers kept from an earlier run, source bytes prepared, time."""

    out_dir: str
    layers_prepared: int
    layers_skipped: int
    bytes_prepared: int
    seconds: float
    layout_id: str


def _layer_bytes(checkpoint: Checkpoint, prefix: str) -> int:
    return sum(checkpoint.entry(name).nbytes for name in checkpoint.layer(prefix).tensor_names)


def prepare_checkpoint(checkpoint: Checkpoint, out_dir: str | os.PathLike, preparers: Sequence[LayerPreparer],
                       backend: str, activation: str = "swiglu", input_scale_policy: str = "max",
                       progress: Callable[[LayerDone], None] | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                       profile: str = "seed", gated_group_size: int = 64) -> PrepareSummary:
    """Prepares every pending MoE layer and writes ``out_dir``; see the module docstring."""
    if not preparers:
        raise ValueError("prepare_checkpoint needs at least one layer preparer")
    layers = checkpoint.moe_layers()
    if not layers:
        raise CheckpointInvalid(f"{checkpoint.directory}: no NVFP4 MoE layers to prepare")
    started = time.perf_counter()
    options = {"profile": profile, "gated_group_size": gated_group_size}
    with PreparedCheckpointWriter(checkpoint, out_dir, backend, activation, input_scale_policy,
                                  max_shard_bytes, overwrite, options) as writer:
        pending = writer.pending_layers()
        sizes = {prefix: _layer_bytes(checkpoint, prefix) for prefix in layers}
        total = sum(sizes.values())
        done = [total - sum(sizes[prefix] for prefix in pending), len(layers) - len(pending)]
        done_lock = threading.Lock()
        todo: queue.Queue[str] = queue.Queue()
        for prefix in pending:
            todo.put(prefix)
        failures: list[BaseException] = []
        stop = threading.Event()

        def work(preparer: LayerPreparer) -> None:
            while not stop.is_set():
                try:
                    prefix = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    stacked = checkpoint.read_layer(prefix, activation=activation)
                    prepared = preparer(stacked, backend, activation, input_scale_policy, **options)
                    writer.write_layer(prefix, prepared)
                except BaseException as exc:  # handed to the caller's thread below
                    log.debug("layer %s failed: %s", prefix, exc)  # the caller reports it, once
                    failures.append(exc)
                    stop.set()
                    return
                with done_lock:
                    done[0] += sizes[prefix]
                    done[1] += 1
                    event = LayerDone(prefix, sizes[prefix], done[0], total, done[1], len(layers))
                if progress is not None:
                    progress(event)

        threads = [threading.Thread(target=work, args=(p,), name=f"prepare-{i}-{j}", daemon=True)
                   for i, p in enumerate(preparers) for j in range(LAYERS_IN_FLIGHT_PER_PREPARER)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            stop.set()  # on KeyboardInterrupt: no worker starts another layer
        if failures:
            raise failures[0]
        writer.finish()
    seconds = time.perf_counter() - started
    summary = PrepareSummary(str(writer.out_dir), len(pending), len(layers) - len(pending),
                             sum(sizes[prefix] for prefix in pending), seconds,
                             str(writer.manifest.layout.get("layout_id", "")))
    log.info("prepared %d layers (%d kept from an earlier run) in %.2fs", summary.layers_prepared,
             summary.layers_skipped, seconds)
    return summary
