"""Checkpoints that reference calls named, kept open for the calls after them.

A reference call names one layer, and opening its checkpoint parses every shard's header (a large model has
hundreds, of a megabyte or more each), which a job that sends one call per layer would otherwise pay again for
every layer. An opened checkpoint is reused while opening its location again would read the very same files,
unchanged (``unchanged_since``: walked as an open walks, within the allowed roots, comparing each file's device,
inode, size, mtime and ctime; a file added, replaced, rewritten or touched shows), else it is opened again. At
most ``CAPACITY`` are kept, the least recently used pushed out, and one left unused for ``IDLE_SECONDS`` is
closed, so that a deleted checkpoint's space comes back: each closes at once when no call uses it, else when
its last call lets go.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from nvfp4_prep import checkpoint as ckpt
from nvfp4_prep.checkpoint.checkpoint import unchanged_since

# Checkpoints kept open: a fleet's server serves a model or two at a time; each holds its parsed headers.
CAPACITY = 4
# Seconds a kept checkpoint no call uses stays open: a job's next layer comes within it; a deleted checkpoint's
# files are let go of after it.
IDLE_SECONDS = 120.0


@dataclass
class _Opened:
    location: str
    checkpoint: ckpt.Checkpoint
    users: int = 0
    kept: bool = True  # still in the table (else closed once ``users`` drops to 0)
    idle_since: float = field(default_factory=time.monotonic)
    sweep: threading.Timer | None = None


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
        if kept is not None:
            fresh = unchanged_since(kept.checkpoint, location, self._allowed_roots)
            with self._lock:
                if self._table.get(location) is kept:
                    if fresh:
                        self._table.move_to_end(location)
                        return self._use(kept)
                    self._drop(self._table.pop(location))  # stale: gone even if opening again fails
        opened = _Opened(location, ckpt.open_checkpoint(location, self._allowed_roots))
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
            if opened.users:
                return
            del self._users[id(checkpoint)]
            if not opened.kept:
                opened.checkpoint.close()
                return
            opened.idle_since = time.monotonic()
            if opened.sweep is None:
                self._sweep_later(opened, IDLE_SECONDS)

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
        if opened.sweep is not None:
            opened.sweep.cancel()
            opened.sweep = None
        if opened.users == 0:
            opened.checkpoint.close()

    def _sweep_later(self, opened: _Opened, seconds: float) -> None:
        opened.sweep = threading.Timer(seconds, self._sweep, args=(opened,))
        opened.sweep.daemon = True
        opened.sweep.start()

    def _sweep(self, opened: _Opened) -> None:
        """Closes ``opened`` if it stayed unused for IDLE_SECONDS, else looks again when it may have."""
        with self._lock:
            opened.sweep = None
            if not opened.kept or opened.users:
                return  # dropped meanwhile, or in use: its last release looks after it
            left = opened.idle_since + IDLE_SECONDS - time.monotonic()
            if left > 0:
                self._sweep_later(opened, left)
            elif self._table.get(opened.location) is opened:
                self._drop(self._table.pop(opened.location))
