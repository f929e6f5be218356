"""Typed errors of checkpoint reading and writing.

Messages name the path, tensor or field and say what was expected, so that the CLI can print them as
they are; the server maps each class to a status code (``nvfp4_prep.server.status``).
"""


class CheckpointError(Exception):
    """Base of every checkpoint error."""


class CheckpointNotFound(CheckpointError):
    """A file, or a layer or tensor that a request names, does not exist."""


class CheckpointPermissionDenied(CheckpointError):
    """A location (or a shard it names) resolves outside the allowed roots."""


class CheckpointInvalid(CheckpointError):
    """The checkpoint is there but malformed: bad header or offsets, config, missing experts or projections."""
