"""One layer's answer as it arrives, kept across the attempts of a call.

Every chunk is CRC-checked before its bytes land, so whatever has arrived
when a stream breaks is verified. The next attempt asks the server to resume
there (``PrepareHeader.resume_from``) instead of sending the layer again. The
server sends the answer's header in full each time; if it differs from the
one the kept bytes belong to (another server version, say), those bytes are
dropped and the attempt after starts from the beginning: bytes of two answers
are never mixed.

Where the bytes land (pageable CPU tensors, a CUDA device through pinned staging, or tensors the caller
allocated) is the ``Placement``'s choice; see ``landing``. A call that asked for CUDA IPC may get the tensors as
device memory handles instead of chunks (``response.ipc``), copied into the same landing; see ``ipc``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import (
    SCALAR_NAMES,
    ChecksumError,
    FramingError,
    TensorReceiver,
    check_scalars,
    chunk_of,
    layout_from_proto,
    read_headers,
)

from .bulk import BulkAttempt
from .errors import PrepChecksumError, PrepLayoutMismatch, PrepProtocolError, PrepUnavailable
from .ipc import HeldRequests, IpcDelivery
from .landing import Landing, Placement
from .result import RemoteLayer


class Progress(NamedTuple):
    """Bytes done of one layer's upload ("upload") or download ("download")."""

    phase: str
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]


class AnswerChanged(PrepUnavailable):
    """A resumed attempt was answered with another layer than the one whose stream broke; retried from the start."""


def _same_answer(first: pb.PreparedHeader, second: pb.PreparedHeader) -> bool:
    return first.layout == second.layout and first.scalars == second.scalars and \
        list(first.tensors) == list(second.tensors)


class Answer:
    """The answer to ``asked``; ``receive`` reads one attempt's stream into it, landing it as ``placement`` says."""

    def __init__(self, asked: pb.PrepareHeader, progress: ProgressCallback | None,
                 placement: Placement | None = None) -> None:
        self.asked = asked
        self._progress = progress
        self._placement = placement or Placement()
        self._header: pb.PreparedHeader | None = None
        self._sink: Landing | None = None
        self._receiver: TensorReceiver | None = None
        self._total = 0

    @property
    def resume_point(self) -> tuple[int, int] | None:
        """(tensor index, offset) up to which verified bytes are held, or None when nothing is."""
        if self._receiver is None or self._receiver.bytes_received == 0:
            return None
        return self._receiver.position

    def request_header(self) -> pb.PrepareHeader:
        """The header of the next attempt: the one asked for, resuming after the bytes already held."""
        point = self.resume_point
        if point is None:
            return self.asked
        header = pb.PrepareHeader()
        header.CopyFrom(self.asked)
        header.resume_from.tensor_index, header.resume_from.offset = point
        return header

    def _start(self, header: pb.PreparedHeader) -> None:
        specs = read_headers(header.tensors, "response.header.tensors")
        total = sum(spec.byte_length for spec in specs)
        try:
            sink = self._placement.landing(specs)  # PrepOutputMismatch for out= tensors that do not fit
        except (RuntimeError, MemoryError) as err:  # a header announcing more than this host can hold
            raise PrepProtocolError(f"response.header.tensors: announce {total} bytes, more than this client can "
                                    f"allocate ({str(err).splitlines()[0]})", field="response.header.tensors") from None
        self._header, self._total, self._sink = header, total, sink
        self._receiver = TensorReceiver(specs, sink, "response.tensors")

    def _drop(self) -> None:
        self.discard()
        self._header = self._sink = self._receiver = None

    def discard(self) -> None:
        """Waits for device copies in flight; for an answer given up (or replaced), before its buffers go."""
        if self._sink is not None:
            self._sink.discard()

    def receive(self, call: Iterator[pb.PrepareResponse], held: HeldRequests | None = None,
                bulk: BulkAttempt | None = None) -> RemoteLayer:
        """Reads one attempt's answer, verifying every chunk, the layout record and the scalars; ``held``: the
        request stream of a call that asked for CUDA IPC, which takes a ``response.ipc`` answer; ``bulk``: the
        call asked for the bulk transport, whose offer then comes first, and the chunks perhaps over its
        connections.

        grpc.RpcError (e.g. a broken stream) passes through with the bytes so far kept for the next attempt.
        """
        resumed = self.resume_point is not None
        first = next(call, None)
        if bulk is not None:
            offered = first is not None and chunk_of(first) is None and first.WhichOneof("message") == "bulk"
            bulk.on_offer(first.bulk if offered else None)
            if offered:
                first = next(call, None)
        if first is None or chunk_of(first) is not None:
            raise PrepProtocolError("response.header: did not come first (expected a PreparedHeader)")
        header, came = first.header, time.perf_counter()
        ipc = None  # once the answer comes by CUDA IPC instead of chunks
        try:
            if resumed and not _same_answer(self._header, header):
                self._drop()
                raise AnswerChanged("response.header: the resumed answer describes another prepared layer than "
                                    "the one whose stream broke; starting over", grpc.StatusCode.UNAVAILABLE)
            if not resumed:
                self._start(header)
            receiver = self._receiver
            for response in bulk.chunks(call) if bulk is not None and bulk.active else call:
                chunk = chunk_of(response)
                if chunk is None or ipc is not None:
                    ipc = ipc or self._ipc(response, held, receiver.bytes_received > 0, came)
                    ipc.receive(response)
                    continue
                receiver.add(chunk)
                if self._progress is not None:
                    self._progress(Progress("download", receiver.bytes_received, self._total))
            if ipc is None:
                receiver.finish()
            else:
                ipc.finish()
                if self._progress is not None:
                    self._progress(Progress("download", self._total, self._total))
            tensors = self._sink.tensors()
            # The scalars are small: read back from a device to compare them with the header's lists.
            scalars = {name: tensors[name].to("cpu") for name in SCALAR_NAMES if name in tensors}
            check_scalars(header.scalars, scalars, "response.header.scalars")
        except ChecksumError as err:
            raise PrepChecksumError(str(err), field=err.field) from None
        except FramingError as err:
            raise PrepProtocolError(str(err), field=err.field) from None
        finally:
            if ipc is not None:
                ipc.abandon()  # nothing once the layer landed
        layout = layout_from_proto(header.layout)
        _check_layout(layout, self.asked)
        return RemoteLayer(tensors=tensors, layout=layout, scalars={
            field.name: list(getattr(header.scalars, field.name)) for field in pb.DerivedScalars.DESCRIPTOR.fields
        }, cache_hit=header.cache_hit)

    def _ipc(self, response: pb.PrepareResponse, held: HeldRequests | None, late: bool, header_came: float
             ) -> IpcDelivery:
        """The CUDA IPC delivery that ``response`` (not a chunk) starts, after a header that came at
        ``header_came``. A message that is none of its, or one unasked or ``late`` (after chunks), breaks the
        framing."""
        kind = response.WhichOneof("message") or "message"
        upfront = bool(self.asked.ipc_destinations)
        if kind not in ("ipc", "ipc_write") and not (kind == "written" and upfront):
            raise FramingError(f"response.{kind}", "arrived out of turn",
                               "chunks, response.ipc or response.ipc_write after the header")
        if held is None:
            raise FramingError(f"response.{kind}", "arrived, but this call did not ask for CUDA IPC", "chunks")
        if late:
            raise FramingError(f"response.{kind}", "arrived after chunks", "CUDA IPC instead of chunks")
        if kind == "ipc_write" and not self.asked.ipc_device_uuid:
            raise FramingError("response.ipc_write", "arrived, but this call named no GPU of its own to write into",
                               "response.ipc: the server's handles")
        return IpcDelivery(read_headers(self._header.tensors, "response.header.tensors"), self._sink, held,
                           self._placement.device, upfront, header_came)


def _check_layout(layout: dict, asked: pb.PrepareHeader) -> None:
    wanted = {"backend": asked.backend, "activation": asked.activation,
              "input_scale_policy": asked.input_scale_policy, "profile": asked.profile,
              "gated_group_size": asked.gated_group_size, "tp_rank": asked.shard.tp_rank,
              "tp_size": asked.shard.tp_size, "ep_rank": asked.shard.ep_rank, "ep_size": asked.shard.ep_size,
              "expert_placement": asked.shard.expert_placement}
    if asked.layout_version:
        wanted["layout_id"] = asked.layout_version
    for key, value in wanted.items():
        if layout.get(key) != value:
            raise PrepLayoutMismatch(f"response.header.layout.{key}: is {layout.get(key)!r}, asked for {value!r}",
                                     field=f"layout.{key}")
