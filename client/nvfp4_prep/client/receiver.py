"""One layer's answer as it arrives, kept across the attempts of a call.

Every chunk is CRC-checked before its bytes land, so whatever has arrived
when a stream breaks is verified. The next attempt asks the server to resume
there (``PrepareHeader.resume_from``) instead of sending the layer again. The
server sends the answer's header in full each time; if it differs from the
one the kept bytes belong to (another server version, say), those bytes are
dropped and the attempt after starts from the beginning: bytes of two answers
are never mixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import (
    ChecksumError,
    FramingError,
    HostTensors,
    TensorReceiver,
    check_scalars,
    chunk_of,
    layout_from_proto,
    read_headers,
)

from .errors import PrepChecksumError, PrepLayoutMismatch, PrepProtocolError, PrepUnavailable
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
    """The answer to ``asked``; ``receive`` reads one attempt's stream into it."""

    def __init__(self, asked: pb.PrepareHeader, progress: ProgressCallback | None) -> None:
        self.asked = asked
        self._progress = progress
        self._header: pb.PreparedHeader | None = None
        self._sink: HostTensors | None = None
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
            sink = HostTensors(specs)
        except (RuntimeError, MemoryError) as err:  # a header announcing more than this host can hold
            raise PrepProtocolError(f"response.header.tensors: announce {total} bytes, more than this client can "
                                    f"allocate ({str(err).splitlines()[0]})", field="response.header.tensors") from None
        self._header, self._total, self._sink = header, total, sink
        self._receiver = TensorReceiver(specs, sink, "response.tensors")

    def _drop(self) -> None:
        self._header = self._sink = self._receiver = None

    def receive(self, call: Iterator[pb.PrepareResponse]) -> RemoteLayer:
        """Reads one attempt's answer, verifying every chunk, the layout record and the scalars.

        grpc.RpcError (e.g. a broken stream) passes through with the bytes so far kept for the next attempt.
        """
        resumed = self.resume_point is not None
        first = next(call, None)
        if first is None or chunk_of(first) is not None:
            raise PrepProtocolError("response.header: did not come first (expected a PreparedHeader)")
        header = first.header
        try:
            if resumed and not _same_answer(self._header, header):
                self._drop()
                raise AnswerChanged("response.header: the resumed answer describes another prepared layer than "
                                    "the one whose stream broke; starting over", grpc.StatusCode.UNAVAILABLE)
            if not resumed:
                self._start(header)
            receiver = self._receiver
            for response in call:
                chunk = chunk_of(response)
                if chunk is None:
                    raise FramingError("response.header", "arrived again", "only chunks after the first header")
                receiver.add(chunk)
                if self._progress is not None:
                    self._progress(Progress("download", receiver.bytes_received, self._total))
            receiver.finish()
            tensors = self._sink.tensors()
            check_scalars(header.scalars, tensors, "response.header.scalars")
        except ChecksumError as err:
            raise PrepChecksumError(str(err), field=err.field) from None
        except FramingError as err:
            raise PrepProtocolError(str(err), field=err.field) from None
        layout = layout_from_proto(header.layout)
        _check_layout(layout, self.asked)
        return RemoteLayer(tensors=tensors, layout=layout, scalars={
            field.name: list(getattr(header.scalars, field.name)) for field in pb.DerivedScalars.DESCRIPTOR.fields
        }, cache_hit=header.cache_hit)


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
