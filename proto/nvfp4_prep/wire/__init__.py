"""Tensor framing shared by the server and the SDK: dtype names, checksums, chunking, records, metadata keys."""

from .checksum import crc32c
from .chunk_codec import Chunk, chunk_of, decode_chunk, decode_request, decode_response, encode_chunk, encode_message
from .dtypes import WIRE_DTYPES, dtype_name, torch_dtype
from .errors import ChecksumError, FramingError
from .framing import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MESSAGE_OVERHEAD,
    MIN_CHUNK_SIZE,
    ChunkSink,
    HostTensors,
    TensorReceiver,
    TensorSpec,
    check_chunk_size,
    encode_tensors,
    fill_chunk,
    header_for,
    iter_pieces,
    read_headers,
    tensor_bytes,
)
from .metadata import (
    AUTHORIZATION_KEY,
    FIELD_METADATA_KEY,
    MAX_CONCURRENT_FIELD,
    MAX_CONCURRENT_PER_CLIENT_FIELD,
    REQUEST_ID_KEY,
    RETRYABLE_FIELDS,
)
from .prefetch import Prefetch
from .records import LAYOUT_FIELDS, SCALAR_NAMES, check_scalars, layout_from_proto, layout_to_proto, scalars_to_proto

__all__ = [
    "AUTHORIZATION_KEY",
    "DEFAULT_CHUNK_SIZE",
    "FIELD_METADATA_KEY",
    "LAYOUT_FIELDS",
    "MAX_CHUNK_SIZE",
    "MAX_CONCURRENT_FIELD",
    "MAX_CONCURRENT_PER_CLIENT_FIELD",
    "MESSAGE_OVERHEAD",
    "MIN_CHUNK_SIZE",
    "REQUEST_ID_KEY",
    "RETRYABLE_FIELDS",
    "SCALAR_NAMES",
    "WIRE_DTYPES",
    "ChecksumError",
    "Chunk",
    "ChunkSink",
    "FramingError",
    "HostTensors",
    "Prefetch",
    "TensorReceiver",
    "TensorSpec",
    "check_chunk_size",
    "check_scalars",
    "chunk_of",
    "crc32c",
    "decode_chunk",
    "decode_request",
    "decode_response",
    "dtype_name",
    "encode_chunk",
    "encode_message",
    "encode_tensors",
    "fill_chunk",
    "header_for",
    "iter_pieces",
    "layout_from_proto",
    "layout_to_proto",
    "read_headers",
    "scalars_to_proto",
    "tensor_bytes",
    "torch_dtype",
]
