"""The prepare job: every MoE layer of a checkpoint through a layer preparer into a prepared checkpoint.

The preparer is a seam of two kinds. A layer preparer is any callable ``(stacked_tensors, backend,
activation, input_scale_policy, **options) -> object with .tensors and .layout`` — the SDK's
``PrepClient.prepare_layer`` for a server, or ``nvfp4_prep.pipeline.prepare`` in process — given the
layer as read here. A ``ReferencePreparer`` names the layer instead (``(location, prefix, backend,
activation, policy, **options)``, the SDK's ``prepare_reference``): the server reads it from its own view
of the checkpoint, so nothing is read here and only prepared bytes travel; each answer's sizes are checked
against this checkpoint's headers. The job is a pipeline whose one serial stage is the disk: two worker
threads per preparer each read a layer, prepare it and stage its shard (header, CRC32C of every tensor, the
carried tensors read); one thread writes the staged shards' bytes, straight from the prepared tensors'
memory; another commits each written file (fsync, rename, manifest) while the next one is written. With
several preparers (one per server) each worker takes the next pending layer as soon as it is free, so
faster servers take more layers. At most ``layers_in_flight`` layers are read, prepared or waiting to be
written at a time, so memory is a few layers whatever the model's size.
Progress goes to a callback, once per finished layer (from the commit thread,
one call at a time, in the order the counts rise), so that the caller picks how
to show it (a bar on a terminal, a line per layer in a log).

With ``tp_size`` or ``ep_size`` above 1 the job writes a rank set (``rank_set``): one
prepared folder per rank, each with its own writer (so resuming, ``overwrite`` and
the other-source refusal work per folder). Each layer is read once and every rank's
shard is prepared from it in turn, each handed to the writer once the one before it
is written, so memory stays one layer plus two ranks' outputs per layer in flight;
progress then comes once per layer x rank.

A BF16 (FP16, FP32) checkpoint is prepared with ``quantize`` (a recipe) and ``activation_scales`` (every
input scale by full tensor name, ``activation_scales.load_activation_scales``): each layer's per-expert weights
and its scales go to a layer preparer, which quantizes and prepares them in one pass (``quantize=``,
``activation_scales=``: ``InProcessPreparer`` and the SDK's ``prepare_layer`` both take them); the other
tensors are carried as they are (BF16), and the manifest's source format says ``bf16``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nvfp4_prep.checkpoint.checkpoint import Checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointInvalid
from nvfp4_prep.checkpoint.formats import BF16
from nvfp4_prep.contract.errors import PrepError

from .activation_scales import layer_scales
from .rank_set import RANKS_NAME, RankSet, RankSetDirectory, RankSetLock, remove_rank_set
from .shard_plan import DEFAULT_MAX_SHARD_BYTES
from .writer import PreparedCheckpointWriter, StagedShard, WrittenShard, source_record

log = logging.getLogger(__name__)

# Worker threads per preparer: while one waits for its layer to be prepared (on a server, or on the device) the
# other reads or stages the next one, so a preparer never waits for this process.
WORKERS_PER_PREPARER = 2


def layers_in_flight(preparers: int) -> int:
    """How many layers may be between the start of their read and the end of their writing at a time: one per
    worker, plus the one being written (the writer, bound by the disk, always has the next one ready)."""
    return WORKERS_PER_PREPARER * preparers + 1


class PreparedLike(Protocol):
    tensors: Mapping[str, torch.Tensor]
    layout: dict


# (stacked, backend, activation, policy, profile=..., gated_group_size=..., tp_rank=..., ...) -> prepared layer
LayerPreparer = Callable[..., PreparedLike]


@dataclass(frozen=True)
class ReferencePreparer:
    """A preparer that sends the layer's name, not its bytes: ``prepare(location, prefix, backend, activation,
    policy, **options)`` with ``location`` the checkpoint as the server sees it (shared storage)."""

    prepare: Callable[..., PreparedLike]
    location: str


Preparer = LayerPreparer | ReferencePreparer


@dataclass(frozen=True)
class LayerDone:
    """One layer written: which, and how far the run is (source bytes, layers kept from an earlier run included).

    For a rank set, one event per layer x rank: ``rank`` names the rank folder, ``done_layers`` and
    ``total_layers`` count layer x rank shards, and a layer's source bytes are spread over its ranks.
    """

    prefix: str
    nbytes: int
    done_bytes: int
    total_bytes: int
    done_layers: int
    total_layers: int
    rank: str = ""


@dataclass(frozen=True)
class PrepareSummary:
    """What a run did: layers prepared now, layers kept from an earlier run, source bytes prepared, time."""

    out_dir: str
    layers_prepared: int
    layers_skipped: int
    bytes_prepared: int
    seconds: float
    layout_id: str  # of the first rank folder for a rank set (each folder's names its shard)
    ranks: tuple[str, ...] = ()  # the rank folders of a set, empty for a single prepared checkpoint


def _layer_bytes(checkpoint: Checkpoint, prefix: str) -> int:
    return sum(checkpoint.entry(name).nbytes for name in checkpoint.layer(prefix).tensor_names)


def _check_referenced(checkpoint: Checkpoint, prefix: str, location: str, layout: Mapping) -> None:
    """CheckpointInvalid when the layer a server read at ``location`` has other sizes (E, H, I) than this
    checkpoint's headers give: the server's path names other files. (File identities cannot be compared:
    device and inode differ across machines; ``verify`` compares the bytes.)"""
    layer = checkpoint.layer(prefix)
    weight = layer.suffixes[0]
    first, down = (checkpoint.entry(f"{prefix}.0.{proj}.{weight}") for proj in (layer.projections[0],
                                                                                  layer.projections[-1]))
    here = {"experts": layer.num_experts, "hidden": down.shape[0], "intermediate": first.shape[0]}
    read = {"experts": layout.get("global_num_experts"), "hidden": layout.get("hidden_dim_unpadded"),
            "intermediate": (layout.get("intermediate_dim_unpadded") or 0) * (layout.get("tp_size") or 1)}
    if read != here:
        raise CheckpointInvalid(
            f"{prefix}: the server read a layer of {read} from {location}, but {checkpoint.directory} holds "
            f"{here}; expected the same checkpoint (check --server-path)")


def _shares(nbytes: int, parts: int) -> list[int]:
    """``nbytes`` split over ``parts`` rank shards (they add up to it), for progress in source bytes."""
    return [nbytes * (i + 1) // parts - nbytes * i // parts for i in range(parts)]


@dataclass(frozen=True)
class _Target:
    """Where one rank's shard of every layer goes: its folder's writer and shard keywords (none: whole layers)."""

    name: str
    writer: PreparedCheckpointWriter
    shard: dict


@dataclass
class _Piece:
    """One staged shard on its way to the writer: which target's, which layer's (None: carried tensors), and
    whether its writing frees a slot of ``layers_in_flight`` (the last piece of a layer does)."""

    target: int
    prefix: str | None
    staged: StagedShard | None  # dropped by the writer once its bytes are written
    frees_slot: bool
    released: threading.Event = field(default_factory=threading.Event)  # set once the writer is done with it


# The request fields that are a preparer's positional arguments.
_CALL_KEYS = ("backend", "activation", "input_scale_policy")


def _check_shard_sizes(checkpoint: Checkpoint, tp_size: int, ep_size: int, expert_placement: str) -> None:
    """PrepError naming the bad size before anything is written: sizes >= 1, a known placement, ep_size <= E."""
    from nvfp4_prep.pipeline.shard import Shard

    shard = Shard(0, tp_size, 0, ep_size, expert_placement)
    shard.check()
    for prefix in checkpoint.moe_layers():
        try:
            shard.expert_ids(checkpoint.layer(prefix).num_experts)
        except PrepError as exc:
            raise PrepError(exc.field, f"{exc.problem} ({prefix})", exc.expected) from None


def _open_targets(stack: contextlib.ExitStack, checkpoint: Checkpoint, out_dir: str | os.PathLike,
                  request: dict, options: dict, max_shard_bytes: int, overwrite: bool, tp_size: int,
                  ep_size: int, expert_placement: str) -> tuple[list[_Target], RankSetDirectory | None]:
    """One writer for ``out_dir`` (a whole-layer checkpoint), or one per rank folder of a set under it."""
    writer_args = (request["backend"], request["activation"], request["input_scale_policy"], max_shard_bytes,
                   overwrite)
    # What else each layer's layout record must say (a quantized source's recipe), beside the preparers' options.
    options = {**options, **{key: value for key, value in request.items() if key not in _CALL_KEYS}}
    if tp_size == ep_size == 1:
        _replace_rank_set(Path(out_dir), overwrite)
        writer = stack.enter_context(PreparedCheckpointWriter(checkpoint, out_dir, *writer_args, options))
        return [_Target("", writer, {})], None
    wanted = RankSet(source_record(checkpoint), {**request, **options}, tp_size, ep_size, expert_placement)
    top = stack.enter_context(RankSetDirectory(out_dir, checkpoint.directory, wanted, overwrite))
    targets = []
    for rank in wanted.ranks:
        shard = rank.shard_options(tp_size, ep_size, expert_placement)
        writer = stack.enter_context(PreparedCheckpointWriter(checkpoint, top.out_dir / rank.folder, *writer_args,
                                                              {**options, **shard}))
        targets.append(_Target(rank.folder, writer, shard))
    return targets, top


def _check_quantize(checkpoint: Checkpoint, preparers: Sequence[Preparer], quantize: str | None,
                    activation_scales: Mapping[str, torch.Tensor] | None) -> None:
    """Before anything is written: a BF16 checkpoint needs a recipe and scales, an NVFP4 one neither, and
    quantizing sends the layers' weights (a server cannot be handed their scales by reference here)."""
    if checkpoint.format == BF16 and not quantize:
        raise CheckpointInvalid(f"{checkpoint.directory}: is unquantized (BF16); expected a recipe to quantize it "
                                "with (--quantize modelopt or llm-compressor) and its activation scales")
    if quantize and checkpoint.format != BF16:
        raise CheckpointInvalid(f"{checkpoint.directory}: is a {checkpoint.format} checkpoint, NVFP4 already; "
                                "expected an unquantized (BF16, FP16 or FP32) checkpoint to quantize")
    if quantize and not activation_scales:
        raise PrepError("activation_scales", "are missing", "the input scales of every MoE layer (W4A4 NVFP4 needs "
                                                            "them): an NVFP4 checkpoint or a calibration file")
    if quantize and any(isinstance(preparer, ReferencePreparer) for preparer in preparers):
        raise ValueError("quantizing a checkpoint sends its layers' weights: give layer preparers, not references "
                         "(--send tensors)")


def _replace_rank_set(out_dir: Path, overwrite: bool) -> None:
    """A whole-layer run into a directory holding a rank set: refused, or with ``overwrite`` the set removed."""
    previous = RankSet.load(out_dir) if out_dir.is_dir() else None
    if previous is None:
        return
    if not overwrite:
        raise CheckpointInvalid(
            f"output directory {out_dir} holds a rank set (tp_size {previous.tp_size}, ep_size {previous.ep_size}, "
            f"{RANKS_NAME}); pass --overwrite to replace it with a single prepared checkpoint, or choose another --out")
    with RankSetLock(out_dir):
        remove_rank_set(out_dir, previous)


def prepare_checkpoint(checkpoint: Checkpoint, out_dir: str | os.PathLike, preparers: Sequence[Preparer],
                       backend: str, activation: str = "swiglu", input_scale_policy: str = "max",
                       progress: Callable[[LayerDone], None] | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                       profile: str = "seed", gated_group_size: int = 64, tp_size: int = 1, ep_size: int = 1,
                       expert_placement: str = "linear", quantize: str | None = None,
                       activation_scales: Mapping[str, torch.Tensor] | None = None) -> PrepareSummary:
    """Prepares every pending MoE layer and writes ``out_dir`` (or its rank set); see the module docstring."""
    if not preparers:
        raise ValueError("prepare_checkpoint needs at least one layer preparer")
    _check_quantize(checkpoint, preparers, quantize, activation_scales)
    layers = checkpoint.moe_layers()
    if not layers:
        raise CheckpointInvalid(f"{checkpoint.directory}: no NVFP4 MoE layers to prepare")
    if (tp_size, ep_size) != (1, 1):
        _check_shard_sizes(checkpoint, tp_size, ep_size, expert_placement)
    started = time.perf_counter()
    options = {"profile": profile, "gated_group_size": gated_group_size}
    request = {"backend": backend, "activation": activation, "input_scale_policy": input_scale_policy}
    if quantize:  # part of what a resumed run must match: the layers of another recipe hold other bytes
        request["quantize_recipe"] = quantize
    with contextlib.ExitStack() as stack:
        targets, top = _open_targets(stack, checkpoint, out_dir, request, options, max_shard_bytes, overwrite,
                                     tp_size, ep_size, expert_placement)
        pending = [set(target.writer.pending_layers()) for target in targets]
        todo_layers = [prefix for prefix in layers if any(prefix in waiting for waiting in pending)]
        shares = {prefix: _shares(_layer_bytes(checkpoint, prefix), len(targets)) for prefix in layers}
        total = sum(sum(parts) for parts in shares.values())
        kept = [(prefix, i) for prefix in layers for i in range(len(targets)) if prefix not in pending[i]]
        done = [sum(shares[prefix][i] for prefix, i in kept), len(kept)]
        total_pieces = len(layers) * len(targets)
        prepared_bytes = [0]
        todo: queue.Queue[str] = queue.Queue()
        for prefix in todo_layers:
            todo.put(prefix)
        failures: list[BaseException] = []
        stop = threading.Event()  # no layer is started once set: a stage failed, or the caller was interrupted
        abandon = threading.Event()  # nothing more is written or committed: the caller was interrupted
        slots = threading.Semaphore(layers_in_flight(len(preparers)))
        to_write: queue.Queue[_Piece | None] = queue.Queue()  # bounded by the slots
        to_commit: queue.Queue[tuple[_Piece, WrittenShard] | None] = queue.Queue(maxsize=1)

        def fail(exc: BaseException) -> None:
            log.debug("prepare job failed: %s", exc)  # the caller reports it, once
            failures.append(exc)
            stop.set()

        def layer_source(preparer: Preparer, prefix: str) -> Callable[[dict], PreparedLike]:
            """``prepare(shard keywords)`` for one layer: by reference, or from its tensors read once here."""
            if isinstance(preparer, ReferencePreparer):
                def referenced(shard: dict) -> PreparedLike:
                    prepared = preparer.prepare(preparer.location, prefix, backend, activation, input_scale_policy,
                                                **options, **shard)
                    _check_referenced(checkpoint, prefix, preparer.location, prepared.layout)
                    return prepared
                return referenced
            if quantize:
                weights, scales = checkpoint.read_bf16_layer(prefix), layer_scales(activation_scales, prefix)
                return lambda shard: preparer(weights, backend, activation, input_scale_policy, **options, **shard,
                                              quantize=quantize, activation_scales=scales)
            stacked = checkpoint.read_layer(prefix, activation=activation)  # once for every rank
            return lambda shard: preparer(stacked, backend, activation, input_scale_policy, **options, **shard)

        def take_slot() -> bool:
            """Waits for a slot of ``layers_in_flight``; False (and none held) once the job stops."""
            slots.acquire()
            if stop.is_set():
                slots.release()
                return False
            return True

        def send_layer(preparer: Preparer, prefix: str) -> None:
            """Reads and prepares one layer (each rank's shard in turn) and hands its pieces to the writer. The
            slot taken for the layer goes with its last piece, or back if the layer never gets that far."""
            holding = True
            try:
                prepare_shard = layer_source(preparer, prefix)
                ranks = [i for i in range(len(targets)) if prefix in pending[i]]
                previous: threading.Event | None = None
                for n, i in enumerate(ranks):
                    if stop.is_set():
                        return
                    staged = targets[i].writer.stage_layer(prefix, prepare_shard(targets[i].shard))
                    if previous is not None:
                        previous.wait()  # one piece of this layer with the writer at a time
                    piece = _Piece(i, prefix, staged, frees_slot=n == len(ranks) - 1)
                    del staged  # from here the writer drops the output once it is written
                    holding, previous = not piece.frees_slot, piece.released
                    to_write.put(piece)
                    del piece
            finally:
                if holding:
                    slots.release()

        def work(preparer: Preparer) -> None:
            while take_slot():
                try:
                    prefix = todo.get_nowait()
                except queue.Empty:
                    slots.release()
                    return
                try:
                    send_layer(preparer, prefix)
                except BaseException as exc:  # handed to the caller's thread below
                    fail(exc)
                    return

        def write() -> None:
            """The serial stage: each staged shard's bytes into its partial file, in arrival order. What was
            prepared before another stage failed is still written (a rerun keeps it); after its own failure
            (the disk) or an interrupt, the rest is dropped."""
            failed = False
            while (piece := to_write.get()) is not None:
                written = None
                try:
                    if not (failed or abandon.is_set()):
                        written = targets[piece.target].writer.write(piece.staged)
                except BaseException as exc:
                    failed = True
                    fail(exc)
                finally:
                    piece.staged = None  # the bytes are in the page cache (or dropped): free the tensors now
                    piece.released.set()
                    if piece.frees_slot:
                        slots.release()
                if written is not None:
                    to_commit.put((piece, written))
            to_commit.put(None)

        def commit() -> None:
            """fsync, rename and manifest of each written file (while the next is written), then progress.
            As for writing: dropped only after a failure here or an interrupt."""
            failed = False
            while (item := to_commit.get()) is not None:
                piece, written = item
                if failed or abandon.is_set():
                    written.file.discard()
                    continue
                try:
                    targets[piece.target].writer.commit(written)
                    if piece.prefix is not None:
                        share = shares[piece.prefix][piece.target]
                        done[0] += share
                        done[1] += 1
                        prepared_bytes[0] += share
                        if progress is not None:
                            progress(LayerDone(piece.prefix, share, done[0], total, done[1], total_pieces,
                                               targets[piece.target].name))
                except BaseException as exc:
                    failed = True
                    fail(exc)

        def queue_carried() -> None:
            """The shards of tensors outside the MoE layers, staged here and written after every layer."""
            for i, target in enumerate(targets):
                for shard in target.writer.pending_carried():
                    if not take_slot():
                        return
                    try:
                        to_write.put(_Piece(i, None, target.writer.stage_carried(shard), frees_slot=True))
                    except BaseException as exc:
                        slots.release()
                        fail(exc)
                        return

        workers = [threading.Thread(target=work, args=(p,), name=f"prepare-{i}-{j}", daemon=True)
                   for i, p in enumerate(preparers) for j in range(WORKERS_PER_PREPARER)]
        stages = [threading.Thread(target=write, name="prepare-write", daemon=True),
                  threading.Thread(target=commit, name="prepare-commit", daemon=True)]
        try:
            for thread in (*stages, *workers):
                thread.start()
            for thread in workers:
                thread.join()
            if not stop.is_set():
                queue_carried()
            to_write.put(None)
            for thread in stages:
                thread.join()
        except BaseException:  # KeyboardInterrupt: no worker starts another layer, nothing more is written
            abandon.set()
            stop.set()
            to_write.put(None)
            raise
        if failures:
            raise failures[0]
        for target in targets:
            target.writer.finish()
        if top is not None:
            top.finish()
    seconds = time.perf_counter() - started
    summary = PrepareSummary(str(top.out_dir if top is not None else targets[0].writer.out_dir), len(todo_layers),
                             len(layers) - len(todo_layers), prepared_bytes[0], seconds,
                             str(targets[0].writer.manifest.layout.get("layout_id", "")),
                             tuple(target.name for target in targets) if top is not None else ())
    log.info("prepared %d layers (%d kept from an earlier run) in %.2fs", summary.layers_prepared,
             summary.layers_skipped, seconds)
    return summary
