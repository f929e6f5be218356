"""Writing a file so that it either appears complete under its final name or not at all.

Data goes to a hidden ``.NAME.partial`` file beside the target, is fsynced, then
renamed over the target; the directory is fsynced so the rename survives a crash.
A crashed run leaves only ``.partial`` files, which the next run deletes. Writing
and committing are separate steps (``PartialFile``), so that one thread can fsync
a finished file while another writes the next one and the disk never waits.
"""

from __future__ import annotations

import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
# Bytes per write call: under Linux's per-call limit (2 GiB less a page), so a call writes all it is given.
WRITE_BYTES = 1 << 30


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialFile:
    """``target`` being written under its partial name: ``write`` bytes, then ``commit`` (fsync, rename over
    ``target``, fsync of the directory) or ``discard`` (the partial file removed). Either may run on another
    thread than the writes; after either the file is closed."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = partial_path(target)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)

    def write(self, data: bytes | memoryview) -> None:
        """Writes all of ``data`` (any contiguous buffer: bytes, a numpy array) straight from its memory."""
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view[:WRITE_BYTES]):]

    def commit(self) -> None:
        """Makes the bytes durable under ``target``; on an error the partial file is removed."""
        try:
            os.fsync(self._fd)
            self._close()
            os.replace(self.path, self.target)
        except BaseException:
            self.discard()
            raise
        fsync_directory(self.target.parent)

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    file = PartialFile(target)
    try:
        file.write(data)
    except BaseException:
        file.discard()
        raise
    file.commit()


def remove_partials(directory: Path) -> list[Path]:
    """Deletes the ``.partial`` files an interrupted run left in ``directory``."""
    removed = []
    for path in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
