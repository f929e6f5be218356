"""Typed errors of checkpoint reading and writing.

Each subclass maps to one gRPC status code so that the service can answer a bad
shard reference with the right status, and the CLI can print the message as is.
Messages name the path, tensor or field and say what was expected.
"""


class CheckpointError(Exception):
    """Base of every checkpoint error; ``grpc_code`` names the status it maps to."""

    grpc_code = "INTERNAL"


class CheckpointNotFound(CheckpointError):
    """A file, or a layer or tensor that a request names, does not exist."""

    grpc_code = "NOT_FOUND"


class CheckpointPermissionDenied(CheckpointError):
    """A location (or a shard it names) resolves outside the allowed roots."""

    grpc_code = "PERMISSION_DENIED"


class CheckpointInvalid(CheckpointError):
    """The checkpoint is there but malformed: bad header or offsets, config, missing experts or projections."""

    grpc_code = "INVALID_ARGUMENT"
