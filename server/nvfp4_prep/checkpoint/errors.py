"""Typed errors of checkpoint reading and writing.

Messages name the path, tensor or field and say what was expected, so that the CLI can print them as
they are; the server maps each class to a status code (``nvfp4_prep.server.status``).
"""


class CheckpointError(Exception):
    """Base of every checkpoint error."""


class CheckpointNotFound(CheckpointError):
    """A file, or a layer or tensor that a request names, does not exist."""


class CheckpointPermissionDenied(CheckpointError):
    """A location (or a shard it names) leads outside the allowed roots, or the system refuses to open it."""


class CheckpointInvalid(CheckpointError):
    """The checkpoint is there but malformed: bad header or offsets, config, missing experts or projections."""


# Longest echo of a caller's or a file's string (a location, a shard or tensor name) in a message.
SHOWN_CHARS = 200


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as text of at most about ``limit`` characters: the head and the tail, with ``...`` between.

    Locations and names come from callers and files and may be megabytes long; messages stay readable
    and small enough for a gRPC trailer. The tail is kept because that is where a file name is.
    """
    text = str(value)
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}...{text[len(text) - (limit - head - 3):]}"
