"""Writing a file so that it either appears complete under its final name or not at all.

Data goes to a hidden ``.NAME.partial`` file beside the target, is fsynced, then
renamed over the target; the directory is fsynced so the rename survives a crash.
A crashed run leaves only ``.partial`` files, which the next run deletes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(target: Path) -> Iterator[BinaryIO]:
    """Yields a binary file; on normal exit it replaces ``target``, on error it is removed."""
    temp = partial_path(target)
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_write(target) as handle:
        handle.write(data)


def remove_partials(directory: Path) -> list[Path]:
    """Deletes the ``.partial`` files an interrupted run left in ``directory``."""
    removed = []
    for path in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
