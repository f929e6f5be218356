"""Prepare request messages that are not protobuf at all become INVALID_ARGUMENT, not INTERNAL.

gRPC answers a request deserializer that raises with INTERNAL ("Exception
deserializing request"), which blames the server for the client's bytes. The
Prepare handler decodes with ``decode_request_or_malformed`` instead, which
hands such bytes on as ``Malformed``; ``reject_malformed`` turns the first one
into an INVALID_ARGUMENT naming the message's position in the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, TypeVar

from google.protobuf.message import DecodeError

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import Chunk, decode_request

from .errors import invalid

T = TypeVar("T")


class Malformed(NamedTuple):
    """A request message protobuf could not parse, and why."""

    size: int
    reason: str


def decode_request_or_malformed(raw: bytes) -> Chunk | pb.PrepareRequest | Malformed:
    try:
        return decode_request(raw)
    except (DecodeError, ValueError, RuntimeError) as err:
        return Malformed(len(raw), str(err) or type(err).__name__)


def reject_malformed(messages: Iterator[T | Malformed]) -> Iterator[T]:
    """``messages`` until one is Malformed, which raises INVALID_ARGUMENT."""
    for position, message in enumerate(messages):
        if isinstance(message, Malformed):
            raise invalid(f"request[{position}]", f"is {message.size} bytes that do not parse as a PrepareRequest "
                          f"({message.reason})", "a serialized nvfp4_prep.v1.PrepareRequest")
        yield message
