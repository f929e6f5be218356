"""One Prepare stream, from its header to its last response chunk.

The call reads its parameters, lets its source admit and bring in the layer, prepares it and has the
responder stream it back (or replay it from the cache), or, for a client on this node that asked for CUDA IPC,
writes it into the client's memory or hands it over as device memory handles (``ipc``). Everything it allocates
is local to the call, so a client that goes away (or an error) frees it when the generator closes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from nvfp4_prep import pipeline
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import chunk_of

from .bulk.connection import BulkHub, BulkSession
from .cache import CachedLayer
from .client_memory import ClientMemory
from .config import ServeConfig
from .deadline import CallClock
from .early_answer import EarlyAnswer
from .errors import CallCancelled, invalid
from .ipc import IpcLease, IpcWriteLease, packed_size, packing_room, stream_reason, writes_into_client
from .params import CUDA_IPC, Params, read_params
from .resources import CallResources
from .responder import Responder
from .sources import LayerOnDevice, ReferencedSource, StreamedSource
from .status import end_from_another_thread, status_of


class PrepareCall:
    """A call whose ``header`` arrived (and was admitted); ``requests`` are the messages after it.
    ``ipc_lease_seconds``: --ipc-lease-timeout; ``client_memory``: the server's mappings of same-node clients'
    memory, which CUDA IPC answers are written into."""

    def __init__(self, resources: CallResources, header: pb.PrepareHeader, requests: Iterator,
                 context: grpc.ServicerContext, clock: CallClock, summary: dict[str, object],
                 bulk: BulkHub | None = None, ipc_lease_seconds: float = ServeConfig.ipc_lease_timeout,
                 client_memory: ClientMemory | None = None) -> None:
        self._resources = resources
        self._ipc_lease_seconds = ipc_lease_seconds
        self._client_memory = client_memory
        self._bulk = bulk
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
        if params.quantize:
            self.summary["quantize"] = params.quantize
        kind = header.WhichOneof("source")
        self.summary["source"] = kind
        if kind == "tensors":
            # A client that asked for CUDA IPC keeps its stream open after its chunks, for PrepareRequest.taken
            # or .destinations.
            requests = _announced(self._requests, header.tensors) if params.delivery == CUDA_IPC else self._requests
            source = StreamedSource(header.tensors, requests, self._resources, params, self._clock, self._cancelled)
        elif kind == "ref":
            source = ReferencedSource(header.ref, self._resources, params, self._clock, self._cancelled)
        else:
            raise invalid("header.source", "is not set", "header.tensors or header.ref")
        responder = Responder(header, self._resources, self.summary)
        session = None
        try:
            if header.HasField("bulk"):  # the offer comes first, then the client's choice
                session = BulkSession(self._bulk, header.bulk, self._context, self._clock, self._cancelled)
                yield session.offer()
                requests, responder.bulk = session.choose(self._requests)
                if isinstance(source, StreamedSource):
                    source.requests, source.bulk = requests, responder.bulk
                elif responder.bulk is not None:
                    responder.bulk.take_empty_upload()
                if responder.bulk is not None:
                    self.summary["bulk_streams"] = responder.bulk.streams
            if source.answers_early(header.HasField("resume_from")):
                yield from self._answer_early(source, params, responder)
                return
            with source.layer() as layer:
                if isinstance(layer, CachedLayer):
                    if params.delivery == CUDA_IPC:
                        self.summary["delivery"] = "stream (a cached answer: the cache holds encoded chunks)"
                    yield from responder.replay(layer)
                else:
                    yield from self._compute_and_send(layer, params, responder)
        finally:
            if session is not None:
                session.close()
            if source.inputs:
                self.summary["bytes_in"] = source.inputs

    def _answer_early(self, source: StreamedSource | ReferencedSource, params: Params,
                      responder: Responder) -> Iterator[pb.PrepareResponse | bytes]:
        """Prepares and sends the layer expert group by expert group while it arrives (``early_answer``). Waiting for
        its next bytes is waiting for the client, or the server's read, which the receiving (reading) thread marks
        and bounds: the deadline and --idle-timeout are enforced there (or by the watchdog), and the wait ends
        with the call."""
        def check() -> None:
            if self._cancelled():
                raise CallCancelled("client went away while its layer was answered as it arrived")

        with source.arriving() as layer:
            self.summary["answered_early"] = True
            answer = None
            try:
                tensors = layer.arrivals.tensors(check)
                prep = pipeline.preparation(tensors, params.backend, params.activation, params.policy,
                                            **params.options())
                answer = EarlyAnswer(prep, tensors, layer.arrivals, layer.worker, check, self._clock.deadline)
                header = answer.header()
                chunks = answer.chunks(self._resources.chunk_size, layer.worker.ring(), responder.held())
                yield from responder.send_early(header, chunks, params.backend)
            finally:
                if answer is not None:
                    self.summary["compute_s"] = round(answer.compute_seconds, 4)

    def _compute_and_send(self, layer: LayerOnDevice, params: Params,
                          responder: Responder) -> Iterator[pb.PrepareResponse | bytes]:
        """Prepares the layer (taking its tensors out, so the inputs die with the compute step) and sends it."""
        self._clock.check("before compute")
        if self._cancelled():
            raise CallCancelled("client went away before compute")
        started = time.perf_counter()
        with self._resources.metrics.stage_timer("prepare", params.backend), self._clock.doing("preparing the layer"):
            prepared = layer.worker.prepare(layer.tensors.pop(), layer.per_expert, params.backend, params.activation,
                                            params.policy, self._clock.deadline, params.options(), params.quantize)
        self.summary["compute_s"] = round(time.perf_counter() - started, 4)
        outputs = sum(tensor.numel() * tensor.element_size() for tensor in prepared.tensors.values())
        reason = stream_reason(params, layer.worker, self._ipc_lease_seconds, self._header.HasField("resume_from"))
        if params.delivery == CUDA_IPC and not reason and self._client_memory is not None \
                and writes_into_client(params, layer.worker):
            lease = IpcWriteLease(layer.worker, prepared, self._ipc_lease_seconds, self._end)
            del prepared  # the lease holds the only references: ending it frees them
            layer.reservation.shrink(max(0, layer.reservation.nbytes - lease.nbytes))  # the outputs, until written
            yield from self._write_into_client(lease, self._client_memory)
            return
        if params.delivery == CUDA_IPC and not reason:
            # Packed into the one storage CUDA IPC exports, the outputs are held twice for a moment. So the packing
            # comes before the reservation shrinks, in the bytes the compute just freed (inputs, assembled copy,
            # quantizer temporaries); what those lack (alignment padding, and outputs larger than stacked inputs:
            # derived scalars, backend padding) is taken from the budget now, or the answer streams.
            packed = packed_size(prepared.tensors.values())
            room = packing_room(layer.reservation, layer.worker.budget, outputs, packed)
            if room is not None:
                with room:
                    lease = IpcLease(layer.worker, prepared, self._ipc_lease_seconds, self._end)
                    del prepared  # the lease holds the only references (views of its buffer): ending it frees them
                    layer.reservation.shrink(layer.reservation.nbytes + room.nbytes - packed)  # only the buffer left
                    yield from self._hand_over(lease)
                return
            reason = (f"the memory budget of {layer.worker.device} has no room now for the packed copy of the "
                      f"{outputs} output bytes that CUDA IPC exports")
        if params.quantize:  # inputs, their NVFP4 form and the temporaries are gone: only the outputs remain
            layer.reservation.shrink(layer.reservation.nbytes - outputs)
        else:
            layer.reservation.shrink(layer.inputs * (2 if layer.per_expert else 1))
        if reason:
            self.summary["delivery"] = f"stream ({reason})"
        yield from responder.send(layer.worker, prepared, layer.ring, layer.key, params.backend)

    def _hand_over(self, lease: IpcLease) -> Iterator[pb.PrepareResponse]:
        """Sends the header and the CUDA IPC handles, then holds the tensors (and the call's memory budget)
        until the client takes them, the call ends, or the lease runs out (see ``ipc``). Not cached: the cache
        holds encoded chunks, which this answer never makes."""
        self.summary.update(delivery="cuda_ipc", bytes_out=lease.nbytes)
        try:
            yield pb.PrepareResponse(header=lease.header)
            yield pb.PrepareResponse(ipc=lease.message)
            handed = time.perf_counter()
            with self._clock.doing("waiting for its client to copy the layer handed over by CUDA IPC", client=True):
                lease.wait_taken(self._requests)
            self.summary["handover_s"] = round(time.perf_counter() - handed, 4)  # the client's open, copy and take
        finally:
            lease.release()

    def _write_into_client(self, lease: IpcWriteLease, memory: ClientMemory) -> Iterator[pb.PrepareResponse]:
        """Sends the header and asks for the client's destinations (unless they came up front), writes the tensors
        there and says so. Not cached, as a hand-over."""
        self.summary.update(delivery="cuda_ipc (written into the client's memory)", bytes_out=lease.nbytes)
        try:
            destinations = lease.named(self._header.ipc_destinations) if self._header.ipc_destinations else None
            self.summary["ipc_destinations"] = "up front" if destinations is not None else "asked for"
            yield pb.PrepareResponse(header=lease.header)
            if destinations is None:
                yield pb.PrepareResponse(ipc_write=lease.message)
            asked = time.perf_counter()
            if destinations is None:
                with self._clock.doing("waiting for its client's destinations of the layer", client=True):
                    destinations = lease.destinations(self._requests)
            if self._cancelled():  # a client that gave up may have freed or reused its destinations since
                raise CallCancelled("client went away before its layer was written into its memory")
            with self._clock.doing("writing the layer into its client's memory"):
                written = lease.write(destinations, memory)
            self.summary["handover_s"] = round(time.perf_counter() - asked, 4)  # the destinations and the copies
            yield pb.PrepareResponse(written=written)
        finally:
            lease.release()

    def _end(self, error: Exception) -> None:
        """Ends the call from another thread (its handler waits inside gRPC for the client)."""
        end_from_another_thread(self._context, status_of(error))


def _announced(requests: Iterator, tensors: pb.TensorSet) -> Iterator:
    """``requests`` up to the last byte the header announced, leaving the stream open behind them (a client
    that asked for CUDA IPC ends it with PrepareRequest.taken, not after its chunks)."""
    total = sum(tensor.byte_length for tensor in tensors.tensors)
    received = 0
    while received < total:
        request = next(requests, None)
        if request is None:
            return
        chunk = chunk_of(request)
        received += len(chunk.data) if chunk is not None else 0  # anything else: the source refuses it
        yield request
