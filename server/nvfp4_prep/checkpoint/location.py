"""Opening a caller's checkpoint location, and the files in it, without a window to leave the allowed roots.

The server reads files that a remote caller names, and whoever can rename entries inside a root can swap
a directory for a symlink between a check by path and an open by path. So nothing is checked and then
reopened: each root is opened as a directory descriptor and the location walked from it one component
at a time, with ``O_NOFOLLOW`` opens relative to the descriptor of the directory before; files are then
read only from the descriptors this walk returned. ``..`` is resolved on the walked chain, never by the
kernel, so it cannot climb above a root. Symlinks are followed by hand (Hugging Face caches link
``snapshots/`` to ``blobs/``): the link is read on its directory's descriptor and its target walked the
same way, at most ``MAX_SYMLINKS`` of them; one that leads outside every root is refused. Without roots
(local CLI use) the same walk starts at ``/`` and may go anywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import CheckpointInvalid, CheckpointNotFound, CheckpointPermissionDenied, shown
from .files import os_error, require_regular

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# As the kernel's own limit on symlinks followed in one lookup.
MAX_SYMLINKS = 40

_COMMON = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = _COMMON | os.O_DIRECTORY | os.O_NOFOLLOW
# The last component may be a file or a directory: O_NONBLOCK so that a FIFO opens at once (to be refused).
_LAST_FLAGS = _COMMON | os.O_NOFOLLOW
_ROOT_FLAGS = _COMMON | os.O_DIRECTORY
# What O_NOFOLLOW gives for a symlink: ELOOP (Linux, macOS), EMLINK (FreeBSD), EFTYPE (NetBSD).
_SYMLINK_ERRNOS = {errno.ELOOP, errno.EMLINK, getattr(errno, "EFTYPE", errno.ELOOP)}

# A walked directory: (index of its root, names of the directories from the root down to it).
Place = tuple[int, tuple[str, ...]]


def location_to_path(location: PathLike) -> Path:
    """A plain path or a ``file://`` URI (no host, or ``localhost``) as a Path."""
    text = os.fspath(location)
    if not isinstance(text, str) or not text:
        raise CheckpointInvalid(f"checkpoint location {shown(location)!r}: expected a non-empty path or file:// URI")
    if "\x00" in text:
        raise CheckpointInvalid("checkpoint location contains a NUL byte: expected a path or file:// URI")
    if "://" in text:
        uri = urlparse(text)
        if uri.scheme != "file":
            raise CheckpointInvalid(
                f"checkpoint location {shown(text)!r}: scheme {shown(uri.scheme)!r} is not supported "
                "(expected a path or file:// URI)")
        if uri.netloc not in ("", "localhost"):
            raise CheckpointInvalid(
                f"checkpoint location {shown(text)!r}: host {shown(uri.netloc)!r} is not supported "
                "(expected file:///absolute/path)")
        text = unquote(uri.path)
        if not text:
            raise CheckpointInvalid(f"checkpoint location {shown(location)!r}: the file:// URI has no path")
    return Path(text)


def _components(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part not in ("", "."))


@dataclass(frozen=True)
class _Root:
    """A root to walk from: the real path opened, and the component prefixes a path under it starts with."""

    real: str
    prefixes: tuple[tuple[str, ...], ...]


def _root(path: PathLike) -> _Root:
    configured = os.path.abspath(os.fspath(path))
    real = os.path.realpath(configured)
    return _Root(real, tuple({_components(configured), _components(real)}))


@dataclass
class Opened:
    """A regular file or directory opened by a walk; the caller owns ``fd``."""

    fd: int
    display: str
    stat: os.stat_result

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Found:
    """Where a location led: the checkpoint directory, and the file the location named, if it named one."""

    directory: Place
    display: str
    file: Opened | None


class Tree:
    """The directories walked for one checkpoint, each opened once; closes them all on exit.

    ``allowed_roots`` None: no restriction. Files it opens belong to the caller, directories to the tree.
    """

    def __init__(self, allowed_roots: Sequence[PathLike] | None) -> None:
        self.restricted = allowed_roots is not None
        self._roots = [_root(root) for root in allowed_roots] if allowed_roots is not None else [_Root("/", ((),))]
        self._dirs: dict[Place, int] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open_location(self, location: PathLike, what: str = "checkpoint location") -> Found:
        """Walks to ``location`` (a path or file:// URI); a file it names comes back opened."""
        text = os.fspath(location_to_path(location))
        if not text.startswith("/"):
            if self.restricted:
                raise CheckpointInvalid(
                    f"{what} {shown(text)!r}: expected an absolute path under the allowed roots")
            text = os.path.join(os.getcwd(), text)
        root, rest = self._root_of(text, what, text)
        # The directory the location names a file in is the checkpoint directory, wherever a symlink to the
        # file leads (snapshots/<rev>/model.safetensors -> ../../blobs/<hash>: the configs are in <rev>).
        parent, _ = self._walk((root, ()), rest[:-1], what, text, directory=True)
        place, file = self._walk(parent, rest[-1:], what, text)
        if file is not None:
            place = parent
        if not self.restricted:  # local use: messages name the real path, as the user's shell would see it
            return Found(place, self._real(place), file)
        display = text.rstrip("/") or "/"  # a caller sees the path it sent, never where symlinks led
        return Found(place, os.path.dirname(display) if file is not None else display, file)

    def open_in(self, directory: Found, name: str, what: str, missing_ok: bool = False) -> Opened | None:
        """The regular file ``name`` (relative, no ``..``) in the checkpoint directory.

        A missing file is CheckpointNotFound, or None with ``missing_ok``.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CheckpointInvalid(f"{what} name {shown(name)!r} in {shown(directory.display)}: expected a file name")
        if name.startswith("/") or ".." in name.split("/"):
            raise CheckpointPermissionDenied(
                f"{what} name {shown(name)!r} in {shown(directory.display)}: expected a file name inside "
                "the checkpoint directory")
        display = f"{directory.display}/{name}"
        try:
            _, file = self._walk(directory.directory, list(_components(name)), what, display)
        except CheckpointNotFound:
            if missing_ok:
                return None
            raise
        if file is None:
            raise CheckpointInvalid(f"{shown(display)}: expected a regular file, found a directory")
        return file

    def listdir(self, place: Place) -> list[str]:
        """Names in a walked directory."""
        return sorted(os.listdir(self._dirs[place]))

    def _real(self, place: Place) -> str:
        root, chain = place
        return os.path.join(self._roots[root].real, *chain)

    def _root_of(self, path: str, what: str, display: str) -> tuple[int, list[str]]:
        """The root whose prefix ``path`` starts with (the longest), and the components below it."""
        parts = _components(path)
        best = None
        for index, root in enumerate(self._roots):
            for prefix in root.prefixes:
                if parts[:len(prefix)] == prefix and (best is None or len(prefix) > best[1]):
                    best = (index, len(prefix))
        if best is None:
            raise self._outside(what, display, f"{path} is under no root")
        return best[0], list(parts[best[1]:])

    def _outside(self, what: str, display: str, detail: str) -> CheckpointPermissionDenied:
        # The caller learns neither the roots nor where a symlink leads; the log has the detail.
        log.debug("%s %r refused: %s", what, display, detail)
        return CheckpointPermissionDenied(f"{what} {shown(display)!r} is outside the allowed roots")

    def _dir_fd(self, place: Place, what: str, display: str) -> int:
        """The descriptor of a walked directory; a root's is opened on first use (every other place was
        opened, and stored, by the walk that reached it)."""
        if place in self._dirs or place[1]:
            return self._dirs[place]
        try:
            fd = os.open(self._roots[place[0]].real, _ROOT_FLAGS)
        except OSError as exc:
            raise os_error(exc, what, display) from None
        self._dirs[place] = fd
        return fd

    def _walk(self, start: Place, parts: list[str], what: str, display: str,
              directory: bool = False) -> tuple[Place, Opened | None]:
        """Follows ``parts`` from ``start``: the directory reached, and the regular file if the last part is
        one (with ``directory``, the last part must be a directory too)."""
        root, chain = start
        queue = deque(parts)
        links = 0
        while queue:
            name = queue.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if chain:
                    chain = chain[:-1]
                elif self.restricted:
                    raise self._outside(what, display, "'..' climbs above its root")
                continue
            if (root, (*chain, name)) in self._dirs:
                chain = (*chain, name)
                continue
            parent = self._dir_fd((root, chain), what, display)
            last = not queue
            flags = _LAST_FLAGS if last and not directory else _DIR_FLAGS
            try:
                fd = os.open(name, flags, dir_fd=parent)
            except OSError as exc:
                # With O_DIRECTORY, Linux reports a symlink as ENOTDIR rather than ELOOP.
                maybe_link = exc.errno in _SYMLINK_ERRNOS or (exc.errno == errno.ENOTDIR and flags == _DIR_FLAGS)
                if not maybe_link:
                    raise os_error(exc, what, display) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise CheckpointInvalid(
                        f"{what} {shown(display)!r}: more than {MAX_SYMLINKS} symlinks (a loop?)") from None
                target = self._readlink(name, parent, what, display)
                if target is None:
                    if exc.errno == errno.ENOTDIR:  # a file where a directory was expected
                        raise os_error(exc, what, display) from None
                    queue.appendleft(name)  # replaced by a non-link since the open: look again
                    continue
                if target.startswith("/"):
                    root, rest = self._root_of(target, what, display)
                    chain = ()
                else:
                    rest = target.split("/")
                queue.extendleft(reversed(rest))
                continue
            try:
                st = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                raise os_error(exc, what, display) from None
            if last and not stat.S_ISDIR(st.st_mode):
                try:
                    require_regular(fd, display)
                except BaseException:
                    os.close(fd)
                    raise
                return (root, chain), Opened(fd, display, st)
            chain = (*chain, name)
            self._dirs[(root, chain)] = fd
        self._dir_fd((root, chain), what, display)
        return (root, chain), None

    def _readlink(self, name: str, parent: int, what: str, display: str) -> str | None:
        try:
            return os.readlink(name, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise os_error(exc, what, display) from None
