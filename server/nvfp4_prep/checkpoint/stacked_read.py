"""Reading an NVFP4 MoE layer (or a rank's input shard of it) straight into its stacked tensors (SPEC section 2).

What ``assemble_layer`` makes of the per-expert tensors, without reading them first: that would be one more copy
of the layer (and one more layer in memory). The stacked shapes follow from the shard headers, which are checked
first (every expert's weights and block scales alike, before any byte is read); each weight and block scale is
then read from its file into its rows of the stacked tensors (interleaved rows too) with no copy between, and the
scalars are stacked as ``assemble_layer`` stacks them. A layer of more than ``BYTES_PER_THREAD`` is read by up to
``READ_THREADS`` threads at once (a read from the page cache is a copy, and one thread copies at a fraction of
the memory's bandwidth), tensor by tensor in the plan's order, the scales first (each file's in one read).
``ready`` hears of each run of experts whose rows are all in place (of at least ``READY_BYTES``), in order, so that
a caller can copy them to a device (and prepare them) while later ones are still being read.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nvfp4_prep.contract.layout import ALL_ACTIVATIONS, GATED_ACTIVATIONS, INTERLEAVED_ACTIVATIONS

from .discovery import MoeLayer
from .errors import CheckpointInvalid, shown
from .rank_read import RankReads, TensorRead, stacked_scalars
from .safetensors_file import Interrupt, SafetensorsFile

FileOf = Callable[[str], SafetensorsFile]
# ``ready(stacked, start, end)``: experts ``[start, end)`` of the stacked weights and block scales are read.
Ready = Callable[[Mapping[str, torch.Tensor], int, int], None]
# ``scales(layer)``: the per-expert scales are read and stacked, before any weight; ``layer`` is the whole stacked
# layer (what ``read_stacked`` returns), whose weights and block scales are still being read.
Scales = Callable[[Mapping[str, torch.Tensor]], None]

READ_THREADS = 4
# A layer gets one reader thread per this many bytes (up to READ_THREADS): a small one is read on the caller's.
BYTES_PER_THREAD = 64 << 20
# ``ready`` hears of runs of experts holding at least this many bytes (the last run may hold fewer): each call costs
# its caller a copy per tensor, more than the bytes of a small expert take to read.
READY_BYTES = 16 << 20
# The stacked tensors holding rows of per-expert ones, by (down projection, suffix: 0 weight, 1 block scale).
_STACKED = {(False, 0): "w13_weight", (False, 1): "w13_weight_scale", (True, 0): "w2_weight",
            (True, 1): "w2_weight_scale"}


@dataclass(frozen=True)
class _Task:
    """One read; ``expert``: the stacked expert whose rows it fills (None for scalars or a projection that the
    activation does not use)."""

    run: Callable[[Interrupt | None], None]
    expert: int | None


def read_stacked(layer: MoeLayer, reads: RankReads, file_of: FileOf, compressed: bool, activation: str,
                 pin_memory: bool, interrupt: Interrupt | None, ready: Ready | None,
                 scales: Scales | None = None) -> dict[str, torch.Tensor]:
    """The stacked layer that ``reads`` plan (``Shard()``'s plan: the whole layer), in ``assemble_layer``'s order,
    with every expert's input scales; ``compressed``: compressed-tensors reciprocal scales; ``pin_memory``:
    page-locked weights and block scales (for a fast upload; the caller checks that CUDA is there). The scales
    are read first (a few floats per expert), so that ``scales`` hears of them before any weight is read."""
    used = _used_projections(layer, activation)
    stacked = {name: torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
               for name, (shape, dtype) in _stacked_shapes(layer, reads, file_of, used).items()}
    scalars: dict[str, torch.Tensor] = {}
    tensors, scalar_reads = [], []
    for read in reads.all():  # a key is "expert.projection.suffix"; suffixes 2 and 3 are the per-expert scales
        (tensors if layer.suffixes.index(read.key.split(".")[2]) < 2 else scalar_reads).append(read)
    total = sum(read.nbytes for read in reads.all())
    threads = min(READ_THREADS, max(1, total // BYTES_PER_THREAD))
    _run(_scalar_tasks(scalar_reads, file_of, scalars), threads, interrupt, lambda _: None)
    _, _, global_scale, input_scale = layer.suffixes
    s13, s2 = stacked_scalars(layer, scalars, global_scale, len(reads.expert_ids), activation, compressed)
    a13, a2 = stacked_scalars(layer, scalars, input_scale, layer.num_experts, activation, compressed)
    stacked_layer = {"w13_weight": stacked["w13_weight"], "w13_weight_scale": stacked["w13_weight_scale"],
                     "w13_weight_scale_2": s13, "w13_input_scale": a13,
                     "w2_weight": stacked["w2_weight"], "w2_weight_scale": stacked["w2_weight_scale"],
                     "w2_weight_scale_2": s2, "w2_input_scale": a2}
    if scales is not None:
        scales(stacked_layer)
    weights = [_task(layer, read, file_of(read.name), activation, used, stacked) for read in tensors]
    _run(weights, threads, interrupt, _ready_in_order(weights, len(reads.expert_ids), stacked, ready))
    return stacked_layer


def _used_projections(layer: MoeLayer, activation: str) -> tuple[str, ...]:
    """The projections stacked into W13, in row order: gate and up when gated, else the first (as
    ``assemble_layer`` takes them)."""
    from nvfp4_prep.pipeline.validate import PrepError, check_choice

    try:
        check_choice("activation", activation, ALL_ACTIVATIONS)
    except PrepError as exc:
        raise CheckpointInvalid(f"{shown(layer.prefix)}: {exc}") from None
    *gemm1, _ = layer.projections
    if activation not in GATED_ACTIVATIONS:
        return tuple(gemm1[:1])
    if len(gemm1) < 2:
        raise CheckpointInvalid(f"{shown(layer.prefix)}: has only the {gemm1[0]} and down projections, a non-gated "
                                f"layer; expected gate and up projections for activation {activation} (or relu2)")
    return tuple(gemm1)


def _stacked_shapes(layer: MoeLayer, reads: RankReads, file_of: FileOf, used: tuple[str, ...]
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stacked weight and block scale, from the headers; CheckpointInvalid naming the first
    tensor whose shape or dtype differs from expert 0's first (what the stacked tensor's rows must all be)."""
    down = layer.projections[-1]
    firsts: dict[str, tuple[TensorRead, torch.dtype]] = {}
    for read in reads.experts:
        _, proj, suffix = read.key.split(".")
        kind = layer.suffixes.index(suffix)
        if kind >= 2 or (proj != down and proj not in used):
            continue
        name = _STACKED[proj == down, kind]
        dtype = file_of(read.name).torch_dtype(read.entry)
        first, first_dtype = firsts.setdefault(name, (read, dtype))
        if len(read.shape) != 2 or read.shape != first.shape or dtype != first_dtype:
            raise CheckpointInvalid(
                f"{shown(read.name)}: has shape {list(read.shape)} and dtype {str(dtype).removeprefix('torch.')}; "
                f"expected a 2-D tensor of shape {list(first.shape)} and dtype "
                f"{str(first_dtype).removeprefix('torch.')}, like {shown(first.name)}")
    experts = len(reads.expert_ids)
    shapes = {}
    for name, (first, dtype) in firsts.items():
        rows, cols = first.shape
        shapes[name] = ((experts, rows * (len(used) if name.startswith("w13") else 1), cols), dtype)
    return shapes


def _scalar_tasks(reads: list[TensorRead], file_of: FileOf, scalars: dict[str, torch.Tensor]) -> list[_Task]:
    """The reads of the per-expert scales into ``scalars`` (by key): one per file, ``SafetensorsFile.tensors``."""
    by_file: dict[int, tuple[SafetensorsFile, list[TensorRead]]] = {}
    for read in reads:
        file = file_of(read.name)
        by_file.setdefault(id(file), (file, []))[1].append(read)

    def task(file: SafetensorsFile, group: list[TensorRead]) -> _Task:
        def scalar(interrupt: Interrupt | None) -> None:
            read = file.tensors([item.name for item in group], interrupt=interrupt)
            scalars.update({item.key: read[item.name] for item in group})

        return _Task(scalar, None)

    return [task(file, group) for file, group in by_file.values()]


def _task(layer: MoeLayer, read: TensorRead, file: SafetensorsFile, activation: str, used: tuple[str, ...],
          stacked: dict[str, torch.Tensor]) -> _Task:
    """The read of one weight or block scale into its rows of ``stacked``."""
    position, proj, suffix = read.key.split(".")
    kind = layer.suffixes.index(suffix)
    ranges = ([(read.entry.start, read.entry.nbytes)] if read.rows is None
              else file.block_ranges(read.name, read.rows, read.cols))
    down = layer.projections[-1]
    if proj != down and proj not in used:
        def dropped(interrupt: Interrupt | None) -> None:  # the plan's read all the same (admission counted it)
            file.read_into([memoryview(torch.empty(read.nbytes, dtype=torch.uint8).numpy())], ranges, interrupt)

        return _Task(dropped, None)
    rows = stacked[_STACKED[proj == down, kind]][int(position)]
    if proj != down:
        j, count = used.index(proj), read.shape[0]
        rows = rows[j::len(used)] if activation in INTERLEAVED_ACTIVATIONS else rows[j * count:(j + 1) * count]
    targets = _byte_views(rows)

    def tensor(interrupt: Interrupt | None) -> None:
        file.read_into(targets, ranges, interrupt)

    return _Task(tensor, int(position))


def _byte_views(rows: torch.Tensor) -> list[memoryview]:
    """Flat byte views of a 2-D tensor's memory: one when it is contiguous, else one per row."""
    array = rows.view(torch.uint8).numpy()
    if rows.is_contiguous():
        return [memoryview(array.reshape(-1))]
    return [memoryview(row) for row in array]


def _ready_in_order(tasks: list[_Task], experts: int, stacked: Mapping[str, torch.Tensor],
                    ready: Ready | None) -> Callable[[_Task], None]:
    """What to do once a task is done: tell ``ready`` of the experts whose every read is done, in order."""
    left = Counter(task.expert for task in tasks if task.expert is not None)
    per_expert = sum(tensor[0].numel() * tensor.element_size() for tensor in stacked.values() if len(tensor))
    run = max(1, -(-READY_BYTES // max(per_expert, 1)))
    upto = told = 0

    def done(task: _Task) -> None:
        nonlocal upto, told
        if task.expert is None:
            return
        left[task.expert] -= 1
        while upto < experts and left[upto] == 0:
            upto += 1
        if ready is not None and upto > told and (upto - told >= run or upto == experts):
            ready(stacked, told, upto)
            told = upto

    return done


class _Stopped(Exception):
    """Another reader thread failed: this one stops too."""


def _run(tasks: list[_Task], threads: int, interrupt: Interrupt | None, done: Callable[[_Task], None]) -> None:
    """Runs ``tasks`` in order, on the calling thread or, with ``threads`` > 1, on that many daemon threads, and
    ``done`` on the calling thread after each; raises the first failure once every thread stopped (none still
    writes into the tensors then)."""
    if threads == 1:
        for task in tasks:
            task.run(interrupt)
            done(task)
        return
    todo = iter(tasks)
    lock = threading.Lock()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise _Stopped
        if interrupt is not None:
            interrupt()

    def work() -> None:
        try:
            while not stop.is_set():
                with lock:
                    task = next(todo, None)
                if task is None:
                    return
                task.run(check)
                finished.put(task)
        except BaseException as error:  # handed to the calling thread
            stop.set()
            finished.put(error)
        finally:
            finished.put(None)

    for _ in range(threads):
        threading.Thread(target=work, name="nvfp4-prep-read-part", daemon=True).start()
    failure: BaseException | None = None
    running = threads
    while running:
        item = finished.get()
        if item is None:
            running -= 1
        elif isinstance(item, BaseException):
            if failure is None and not isinstance(item, _Stopped):
                failure = item
        elif failure is None:
            try:
                done(item)
            except BaseException as error:
                failure = error
                stop.set()
    if failure is not None:
        raise failure
