"""Checkpoints that reference calls named, kept open for the calls after them.

A reference call names one layer, and opening its checkpoint parses every shard's header (a large model has
hundreds, of a megabyte or more each), which a job that sends one call per layer would otherwise pay again for
every layer. An opened checkpoint is reused while each file it was opened from (configs, index, shards) still
has the identity it had then (device, inode, size, mtime, ctime, by ``os.stat`` of its path: a file replaced,
rewritten or touched shows), else it is opened again. At most ``CAPACITY`` are kept, the least recently used
pushed out: closed at once when no call uses it, else when its last call lets go.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from nvfp4_prep import checkpoint as ckpt
from nvfp4_prep.checkpoint.files import identity

# Checkpoints kept open: a fleet's server serves a model or two at a time; each holds its parsed headers.
CAPACITY = 4


@dataclass
class _Opened:
    checkpoint: ckpt.Checkpoint
    users: int = 0
    kept: bool = True  # still in the table (else closed once ``users`` drops to 0)

    def unchanged(self) -> bool:
        """Whether every file the checkpoint was opened from is still the same file, unchanged."""
        try:
            return all(identity(os.stat(path)) == known for path, known in self.checkpoint.file_identities())
        except OSError:
            return False


class OpenCheckpoints:
    """The server's table of open checkpoints, by location as the calls name it, under ``allowed_roots``."""

    def __init__(self, allowed_roots: Sequence[str]) -> None:
        self._allowed_roots = tuple(allowed_roots)
        self._lock = threading.Lock()
        self._table: OrderedDict[str, _Opened] = OrderedDict()
        self._users: dict[int, _Opened] = {}  # by id() of the checkpoint handed out

    def acquire(self, location: str) -> ckpt.Checkpoint:
        """The checkpoint at ``location``, open until ``release``: a kept one when nothing it reads changed, else
        one opened now (its errors raised as ``open_checkpoint`` raises them). It may block on a hung mount: call
        it where the call's deadline bounds it."""
        with self._lock:
            kept = self._table.get(location)
        if kept is not None and kept.unchanged():
            with self._lock:
                if self._table.get(location) is kept:
                    self._table.move_to_end(location)
                    return self._use(kept)
        opened = _Opened(ckpt.open_checkpoint(location, self._allowed_roots))
        with self._lock:
            replaced = self._table.pop(location, None)
            if replaced is not None:
                self._drop(replaced)
            self._table[location] = opened
            while len(self._table) > CAPACITY:
                self._drop(self._table.popitem(last=False)[1])
            return self._use(opened)

    def release(self, checkpoint: ckpt.Checkpoint) -> None:
        """Ends one ``acquire``'s use of ``checkpoint``; closes it if it was pushed out and this was its last."""
        with self._lock:
            opened = self._users[id(checkpoint)]
            opened.users -= 1
            if opened.users == 0:
                del self._users[id(checkpoint)]
                if not opened.kept:
                    opened.checkpoint.close()

    def close(self) -> None:
        """Closes every kept checkpoint that no call uses (the others close when their calls let go)."""
        with self._lock:
            while self._table:
                self._drop(self._table.popitem()[1])

    def _use(self, opened: _Opened) -> ckpt.Checkpoint:
        opened.users += 1
        self._users[id(opened.checkpoint)] = opened
        return opened.checkpoint

    def _drop(self, opened: _Opened) -> None:
        opened.kept = False
        if opened.users == 0:
            opened.checkpoint.close()
