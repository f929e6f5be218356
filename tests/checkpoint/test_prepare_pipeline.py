"""The prepare job as a pipeline: layers are prepared while earlier ones are written, a few at a time."""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import torch

from nvfp4_prep.checkpoint import open_checkpoint
from nvfp4_prep.pipeline import PreparedLayer, prepare
from nvfp4_prep.prepared.prepare_job import LayerDone, layers_in_flight, prepare_checkpoint
from nvfp4_prep.prepared.verify import verify_prepared
from tests.helpers.checkpoint_factory import moe_checkpoint


class LiveOutputs:
    """Prepared layers whose output memory is still alive: each output is moved into a numpy array of its own,
    and an array is freed only once nothing (no tensor, no view of one) refers to its memory any longer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alive: dict[int, int] = {}  # layer call -> its output arrays still alive
        self.seen_at_calls: list[int] = []  # at each call: how many earlier layers' outputs were alive

    def _freed(self, call: int) -> None:
        with self._lock:
            self._alive[call] -= 1
            if not self._alive[call]:
                del self._alive[call]

    def preparer(self, stacked, backend: str, activation: str, policy: str, **options) -> PreparedLayer:
        with self._lock:
            self.seen_at_calls.append(len(self._alive))
            call = len(self.seen_at_calls)
        prepared = prepare(stacked, backend, activation, policy, **options)
        tensors = {}
        for name, tensor in prepared.tensors.items():
            array = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
            tensors[name] = torch.from_numpy(array).view(tensor.dtype).reshape(tensor.shape)
            weakref.finalize(array, self._freed, call)
        with self._lock:
            self._alive[call] = len(tensors)
        return PreparedLayer(tensors, prepared.layout)


def test_layers_are_prepared_while_earlier_ones_are_written_and_few_are_held(tmp_path: Path) -> None:
    source = moe_checkpoint(tmp_path / "src", 10, 4, 256, 128, seed=2, dense=True)
    live = LiveOutputs()
    done: list[LayerDone] = []

    def slow_progress(event: LayerDone) -> None:  # called once a layer is committed: a slow disk, in effect
        done.append(event)
        time.sleep(0.1)

    with open_checkpoint(source) as checkpoint:
        summary = prepare_checkpoint(checkpoint, tmp_path / "out", [live.preparer], "flashinfer_cutlass",
                                     progress=slow_progress)
    assert summary.layers_prepared == 10 and [event.done_layers for event in done] == list(range(1, 11))
    assert verify_prepared(tmp_path / "out", source) == []
    # While the commits lag, the preparer runs ahead of them: at some call an earlier layer's output was still
    # waiting to be written (so preparing overlaps writing) ...
    assert max(live.seen_at_calls) >= 1, live.seen_at_calls
    # ... but never by more than the layers in flight: the one being prepared and the others queued or writing.
    assert max(live.seen_at_calls) <= layers_in_flight(1) - 1, live.seen_at_calls
