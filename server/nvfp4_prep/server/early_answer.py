"""The answer to a streamed layer, prepared and sent expert group by expert group while the layer still arrives.

Every prepared expert of a weight depends on that expert's input bytes alone (``pipeline.Preparation``). Once
the small per-expert scale tensors are in (the SDK sends them first), the answer's header, with its layout record
and derived scalars, can go out; then each prepared weight, in answer order, is gathered and sent in groups of
the experts whose inputs have landed (as many as have once ``GROUP_BYTES`` more came, at least one). So the
answer trails its input by about one group instead of starting after its last byte, and a round trip takes about
the time of its larger direction.
The device's compute lock is taken per group: a slow upload holds no other call's compute back. On a GPU each
call gathers on a stream of its own, which waits only for its own landed bytes: on one stream shared by every
call, a group would also wait for each group queued before it, whose inputs belong to other, slower uploads.

Calls answered this way: an NVFP4 layer streamed in stacked form, or read from a checkpoint by the server (its
scales first, then its experts in order), with the cache off, no resume point and no CUDA IPC; the others have
the whole layer first (``sources``).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from nvfp4_prep.contract.layout import PREPARED_NAMES, STACKED_SCALE_NAMES
from nvfp4_prep.pipeline import Preparation
from nvfp4_prep.pipeline.prepare import WEIGHT_DTYPES
from nvfp4_prep.pipeline.shard import WEIGHT_NAMES
from nvfp4_prep.pipeline.validate import host_scales
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import header_for, layout_to_proto, scalars_to_proto, tensor_bytes

from .arrivals import Arrivals
from .staging import PinnedRing
from .worker import DeviceWorker

# Input bytes a group of experts waits for beyond its first expert (or the rest of the tensor, if less): small
# enough that the answer trails its input closely, large enough that the gathers and copies per group cost little.
GROUP_BYTES = 32 << 20


class EarlyAnswer:
    """One call's answer while its ``inputs`` (the tensors ``arrivals`` was offered, on ``worker``'s device)
    arrive: ``header()`` once the scales are in, then ``chunks()``. ``check`` raises when the call must stop."""

    def __init__(self, prep: Preparation, inputs: Mapping[str, torch.Tensor], arrivals: Arrivals,
                 worker: DeviceWorker, check: Callable[[], None], deadline: float | None) -> None:
        self._prep = prep
        self._inputs = inputs
        self._index = arrivals.index
        self._arrivals = arrivals
        self._worker = worker
        self._check = check
        self._deadline = deadline
        self._outputs: dict[str, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(worker.device) if worker.is_cuda else None
        self.compute_seconds = 0.0

    def _landed(self, name: str, nbytes: int) -> tuple[int, torch.cuda.Event | None]:
        return self._arrivals.wait(self._index[name], nbytes, self._check)

    def header(self) -> pb.PreparedHeader:
        """The answer's header, once the four scale tensors landed: checked and combined on the host, the derived
        scalars are the header's and the answer's last tensors (PrepError naming the input for a bad value)."""
        event = None
        for name in STACKED_SCALE_NAMES:
            _, event = self._landed(name, self._inputs[name].numel() * self._inputs[name].element_size())
        if event is not None:
            event.synchronize()
        scalars = self._prep.scalars(host_scales(self._prep.scale_inputs(self._inputs)))
        device = self._inputs["w13_weight"].device
        for name in PREPARED_NAMES:
            if name in WEIGHT_NAMES:
                with torch.cuda.stream(self._stream):  # the stream that writes it, and frees it after
                    weight = torch.empty(self._prep.weight_shape(name), dtype=torch.uint8, device=device)
                self._worker.live.track(weight)
                self._outputs[name] = weight
            else:
                self._outputs[name] = scalars[name]
        shown = {name: self._shown(name) for name in self._outputs}
        return pb.PreparedHeader(layout=layout_to_proto(self._prep.record), scalars=scalars_to_proto(scalars),
                                 tensors=[header_for(name, tensor) for name, tensor in shown.items()])

    def _shown(self, name: str) -> torch.Tensor:
        tensor = self._outputs[name]
        return tensor.view(WEIGHT_DTYPES[name]) if name in WEIGHT_DTYPES else tensor

    def chunks(self, chunk_size: int, ring: PinnedRing | None, held: int) -> Iterator[tuple[int, int, object]]:
        """``(tensor index, offset, buffer)`` of the answer, in order (as ``DeviceWorker.chunks``), each weight's
        experts gathered as their inputs land; the bytes after the last weight go once the whole request arrived
        and checked out."""
        outputs = list(self._outputs.values())
        for place, name in enumerate(self._outputs):
            if name in WEIGHT_NAMES:
                yield from self._weight(place, name, outputs, chunk_size, ring, held)
                if name == WEIGHT_NAMES[-1]:
                    self._arrivals.finished(self._check)  # its last bytes were read, but the receive may still fail
                continue
            data = tensor_bytes(outputs[place], name)  # a scalar, on the host
            for offset in range(0, len(data), chunk_size):
                yield place, offset, data[offset:offset + chunk_size]

    def _weight(self, place: int, name: str, outputs: list[torch.Tensor], chunk_size: int, ring: PinnedRing | None,
                held: int) -> Iterator[tuple[int, int, object]]:
        prep, source, out = self._prep, self._inputs[name], outputs[place]
        per_input = source[0].numel() * source.element_size() if source.shape[0] else 0
        per_output = out[0].numel()
        needed = [prep.inputs_needed(end) * per_input for end in range(1, prep.experts + 1)]
        start = 0
        while start < prep.experts:
            landed, event = self._landed(name, min(needed[start] + GROUP_BYTES, needed[-1]))
            end = bisect.bisect_right(needed, landed)  # every expert whose inputs are in
            started = time.perf_counter()
            with self._worker.computing(self._deadline, self._stream):
                if event is not None:
                    self._stream.wait_event(event)
                prep.gather(self._inputs, name, out, start, end)
            self.compute_seconds += time.perf_counter() - started
            spans = [(0, 0)] * len(outputs)
            spans[place] = (start * per_output, end * per_output)
            yield from self._worker.chunks(outputs, chunk_size, ring, held, spans, after=self._stream)
            start = end
