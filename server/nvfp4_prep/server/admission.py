"""Admission of one Prepare call: limits, the byte estimate and the device's memory budget, in that order.

Everything is decided from the tensor headers (streamed) or the shard headers (references), before a byte
of tensor data is received, read or pinned. Refusals are domain errors (``errors``); no gRPC here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nvfp4_prep.wire import TensorSpec

from .budget import Reservation
from .estimate import prepared_bytes, reservation_bytes
from .limits import RequestLimits
from .params import Params
from .worker import DeviceWorker


class Admission:
    """Checks a request against the limits and reserves its bytes on the least loaded worker."""

    def __init__(self, workers: Sequence[DeviceWorker], limits: RequestLimits) -> None:
        self.workers = list(workers)
        self.limits = limits

    def pick_worker(self) -> DeviceWorker:
        return min(self.workers, key=DeviceWorker.load)

    def admit_streamed(self, specs: Sequence[TensorSpec], per_expert: bool, params: Params, deadline: float,
                       cancelled: Callable[[], bool]) -> tuple[DeviceWorker, Reservation]:
        """A worker and the reservation for streamed tensors: inputs, assembly copy and outputs."""
        self.limits.check_tensors(specs)
        worker = self.pick_worker()
        need = reservation_bytes(specs, per_expert, params.backend, params.activation, params.profile,
                                 quantize=bool(params.quantize))
        return worker, worker.budget.reserve(need, deadline, cancelled)

    def admit_referenced(self, specs: Sequence[TensorSpec], params: Params, deadline: float,
                         cancelled: Callable[[], bool]) -> tuple[DeviceWorker, Reservation]:
        """A worker and the reservation for a layer read from a checkpoint: the stacked inputs and outputs (a layer
        to quantize: its per-expert weights, what quantizing holds, and outputs)."""
        self.limits.check_tensors(specs, "header.ref")
        worker = self.pick_worker()
        if params.quantize:
            need = reservation_bytes(specs, True, params.backend, params.activation, params.profile, quantize=True)
            return worker, worker.budget.reserve(need, deadline, cancelled)
        inputs = sum(spec.byte_length for spec in specs)
        outputs = prepared_bytes(specs, True, params.backend, params.activation, params.profile) or inputs
        return worker, worker.budget.reserve(inputs + outputs, deadline, cancelled)
