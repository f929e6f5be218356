"""Turning a user-supplied checkpoint location into a real path inside the allowed roots.

The service reads files that a remote caller names, so every path, the checkpoint
directory and each shard it lists, is resolved (``..`` normalised, symlinks
followed) and must then lie under one of the roots the server was configured with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import CheckpointInvalid, CheckpointNotFound, CheckpointPermissionDenied

PathLike = str | os.PathLike


def location_to_path(location: PathLike) -> Path:
    """A plain path or a ``file://`` URI (no host, or ``localhost``) as a Path."""
    text = os.fspath(location)
    if not isinstance(text, str) or not text:
        raise CheckpointInvalid(f"checkpoint location {location!r}: expected a non-empty path or file:// URI")
    if "\x00" in text:
        raise CheckpointInvalid("checkpoint location contains a NUL byte: expected a path or file:// URI")
    if "://" in text:
        uri = urlparse(text)
        if uri.scheme != "file":
            raise CheckpointInvalid(
                f"checkpoint location {text!r}: scheme {uri.scheme!r} is not supported "
                "(expected a path or file:// URI)")
        if uri.netloc not in ("", "localhost"):
            raise CheckpointInvalid(
                f"checkpoint location {text!r}: host {uri.netloc!r} is not supported (expected file:///absolute/path)")
        text = unquote(uri.path)
        if not text:
            raise CheckpointInvalid(f"checkpoint location {location!r}: the file:// URI has no path")
    return Path(text)


def resolve_roots(allowed_roots: Sequence[PathLike] | None) -> list[Path] | None:
    """The real paths of the configured roots (None means: no restriction)."""
    if allowed_roots is None:
        return None
    return [Path(os.path.realpath(os.fspath(root))) for root in allowed_roots]


def check_under_roots(path: Path, roots: list[Path] | None, what: str) -> Path:
    """``path`` resolved; raises PermissionDenied when it leaves every root."""
    real = Path(os.path.realpath(path))
    if roots is None:
        return real
    for root in roots:
        if real == root or real.is_relative_to(root):
            return real
    allowed = ", ".join(str(root) for root in roots) or "(none configured)"
    # The resolved path is not echoed: a remote caller learns nothing about where symlinks lead.
    raise CheckpointPermissionDenied(f"{what} {str(path)!r} resolves outside the allowed roots {allowed}")


def resolve_in_roots(location: PathLike, roots: list[Path] | None, what: str = "checkpoint location") -> Path:
    """A location resolved and checked against the roots, and existing."""
    path = location_to_path(location)
    if roots is not None and not path.is_absolute():
        raise CheckpointInvalid(f"{what} {str(path)!r}: expected an absolute path under the allowed roots")
    real = check_under_roots(path.absolute(), roots, what)
    if not real.exists():
        raise CheckpointNotFound(f"{what} {str(path)!r} does not exist")
    return real


def shard_path(directory: Path, name: str, roots: list[Path] | None) -> Path:
    """A shard file named by an index, relative to the checkpoint directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointInvalid(f"shard name {name!r} in {directory}: expected a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointPermissionDenied(
            f"shard name {name!r} in the index of {directory}: expected a file name inside the checkpoint directory")
    real = check_under_roots(directory / relative, roots, "shard")
    if not real.is_file():
        raise CheckpointNotFound(f"shard {str(directory / relative)!r} does not exist or is not a file")
    return real
