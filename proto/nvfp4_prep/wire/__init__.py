"""Tensor framing shared by the server and the SDK: dtype names, checksums, chunking, records, metadata keys."""

from .checksum import crc32c
from .chunk_codec import Chunk, chunk_of, decode_chunk, decode_request, decode_response, encode_chunk, encode_message
from .dtypes import WIRE_DTYPES, dtype_name, torch_dtype
from .errors import ChecksumError, FramingError
from .framing import (
    DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MESSAGE_OVERHEAD, MIN_CHUNK_SIZE, ChunkSink, HostTensors,
    TensorReceiver, TensorSpec, check_chunk_size, encode_tensors, fill_chunk, header_for, iter_pieces, read_headers,
    tensor_bytes,
)
from .metadata import AUTHORIZATION_KEY, FIELD_METADATA_KEY, REQUEST_ID_KEY
from .prefetch import Prefetch
from .records import LAYOUT_FIELDS, SCALAR_NAMES, check_scalars, layout_from_proto, layout_to_proto, scalars_to_proto

__all__ = [
    "AUTHORIZATION_KEY", "FIELD_METADATA_KEY", "REQUEST_ID_KEY",
    "Chunk", "chunk_of", "decode_chunk", "decode_request", "decode_response", "encode_chunk", "encode_message",
    "Prefetch",
    "DEFAULT_CHUNK_SIZE", "LAYOUT_FIELDS", "MAX_CHUNK_SIZE", "MESSAGE_OVERHEAD", "MIN_CHUNK_SIZE", "SCALAR_NAMES",
    "WIRE_DTYPES", "ChecksumError", "ChunkSink", "FramingError", "HostTensors", "TensorReceiver", "TensorSpec",
    "check_chunk_size", "check_scalars", "crc32c", "dtype_name", "encode_tensors", "fill_chunk", "header_for",
    "iter_pieces",
    "layout_from_proto", "layout_to_proto", "read_headers", "scalars_to_proto", "tensor_bytes", "torch_dtype",
]
