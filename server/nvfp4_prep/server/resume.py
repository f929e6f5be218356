"""Resumed answers: a client whose stream broke asks again, naming the position up to which it already holds
verified bytes, and the answer's chunks start there.

The header is always sent in full, so the client can check that it describes
the same prepared layer before it appends anything. Preparing is a pure
function of the inputs and parameters, so a recomputed (or cached) layer has
the same bytes as the one whose stream broke.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import decode_chunk, encode_chunk

from .errors import invalid


@dataclass(frozen=True)
class ResumePoint:
    """The first byte the client still needs: ``offset`` within tensor ``tensor_index`` of the answer."""

    tensor_index: int = 0
    offset: int = 0


START = ResumePoint()


def read_resume(header: pb.PrepareHeader, sizes: Sequence[int]) -> ResumePoint:
    """The header's resume point, checked against the byte sizes of the answer's tensors and moved past
    tensors it already covers; START when the header has none."""
    if not header.HasField("resume_from"):
        return START
    index, offset = header.resume_from.tensor_index, header.resume_from.offset
    if index > len(sizes) or (index == len(sizes) and offset):
        raise invalid("header.resume_from.tensor_index", f"is {index} (offset {offset})",
                      f"0 to {len(sizes) - 1}, an index into the {len(sizes)} tensors of the answer")
    if index < len(sizes) and offset > sizes[index]:
        raise invalid("header.resume_from.offset", f"is {offset}",
                      f"0 to {sizes[index]}, the byte length of tensor {index} of the answer")
    while index < len(sizes) and offset == sizes[index]:
        index, offset = index + 1, 0
    return ResumePoint(index, offset)


def bytes_before(point: ResumePoint, sizes: Sequence[int]) -> int:
    """Bytes of the answer that lie before ``point`` (the client holds them already)."""
    return sum(sizes[:point.tensor_index]) + point.offset


def remaining(tensors: Sequence[torch.Tensor], point: ResumePoint) -> list[torch.Tensor]:
    """The tensors from ``point`` on, the first cut at its offset (a flat byte view, no copy)."""
    rest = list(tensors[point.tensor_index:])
    if rest and point.offset:
        rest[0] = rest[0].contiguous().reshape(-1).view(torch.uint8)[point.offset:]
    return rest


def renumbered(pieces: Iterable[tuple[int, int, object]], point: ResumePoint) -> Iterator[tuple[int, int, object]]:
    """``(index, offset, data)`` pieces of ``remaining(tensors, point)`` as pieces of the whole answer."""
    for index, offset, data in pieces:
        yield index + point.tensor_index, offset + (point.offset if index == 0 else 0), data


def replay_from(chunks: Iterable[bytes], point: ResumePoint) -> Iterator[bytes]:
    """Encoded chunk messages of a cached answer from ``point`` on; the chunk holding it is cut there."""
    if point == START:
        yield from chunks
        return
    for message in chunks:
        chunk = decode_chunk(message)
        if (chunk.tensor_index, chunk.offset + len(chunk.data)) <= (point.tensor_index, point.offset):
            continue
        if chunk.tensor_index == point.tensor_index and chunk.offset < point.offset:
            yield encode_chunk(chunk.tensor_index, point.offset, chunk.data[point.offset - chunk.offset:])
        else:
            yield message
