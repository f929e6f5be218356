"""One Prepare stream, from its header to its last response chunk.

The call reads its parameters, lets its source admit and bring in the layer, prepares it and has the
responder stream it back (or replay it from the cache). Everything it allocates is local to the call, so
a client that goes away (or an error) frees it when the generator closes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb

from .cache import CachedLayer
from .deadline import CallClock
from .errors import CallCancelled, invalid
from .params import Params, read_params
from .resources import CallResources
from .responder import Responder
from .sources import LayerOnDevice, ReferencedSource, StreamedSource


class PrepareCall:
    """A call whose ``header`` arrived (and was admitted); ``requests`` are the messages after it."""

    def __init__(self, resources: CallResources, header: pb.PrepareHeader, requests: Iterator,
                 context: grpc.ServicerContext, clock: CallClock, summary: dict[str, object]) -> None:
        self._resources = resources
        self._header = header
        self._requests = requests
        self._context = context
        self._clock = clock
        self.summary = summary

    def _cancelled(self) -> bool:
        return not self._context.is_active()

    def run(self) -> Iterator[pb.PrepareResponse | bytes]:
        header = self._header
        params = read_params(header)
        self.summary.update(backend=params.backend, activation=params.activation, policy=params.policy)
        kind = header.WhichOneof("source")
        self.summary["source"] = kind
        if kind == "tensors":
            source = StreamedSource(header.tensors, self._requests, self._resources, params, self._clock,
                                    self._cancelled)
        elif kind == "ref":
            source = ReferencedSource(header.ref, self._resources, params, self._clock, self._cancelled)
        else:
            raise invalid("header.source", "is not set", "header.tensors or header.ref")
        responder = Responder(header, self._resources, self.summary)
        try:
            with source.layer() as layer:
                if isinstance(layer, CachedLayer):
                    yield from responder.replay(layer)
                else:
                    yield from self._compute_and_send(layer, params, responder)
        finally:
            if source.inputs:
                self.summary["bytes_in"] = source.inputs

    def _compute_and_send(self, layer: LayerOnDevice, params: Params,
                          responder: Responder) -> Iterator[pb.PrepareResponse | bytes]:
        """Prepares the layer (taking its tensors out, so the inputs die with the compute step) and sends it."""
        self._clock.check("before compute")
        if self._cancelled():
            raise CallCancelled("client went away before compute")
        started = time.perf_counter()
        with self._resources.metrics.stage_timer("prepare", params.backend), self._clock.doing("preparing the layer"):
            prepared = layer.worker.prepare(layer.tensors.pop(), layer.per_expert, params.backend, params.activation,
                                            params.policy, self._clock.deadline, params.options())
        self.summary["compute_s"] = round(time.perf_counter() - started, 4)
        layer.reservation.shrink(layer.inputs * (2 if layer.per_expert else 1))
        yield from responder.send(layer.worker, prepared, layer.ring, layer.key, params.backend)
