"""Progress of a long CLI job: a bar on a terminal, one plain line per layer anywhere else.

Logs that are not terminals (CI, Kubernetes Job logs) keep every ``\\r`` frame a bar writes, so off a TTY
each finished layer (layer x rank, for a rank set) prints one line instead. Sizes are decimal megabytes
everywhere (bar, lines and the summary), so the figures a user compares are in one unit
(``units.human_bytes`` writes them).
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from nvfp4_prep.prepared.prepare_job import LayerDone

from .units import MB, human_bytes


def megabytes(nbytes: int) -> str:
    """``nbytes`` in the bar's unit, so that the lines and the summary read like the bar."""
    return human_bytes(nbytes, "MB")


class LayerProgress:
    """A ``prepare_checkpoint`` progress callback writing to ``stream`` (stderr by default)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._bar = None
        self._tty = enabled and self._stream.isatty()

    def __call__(self, event: LayerDone) -> None:
        if not self._enabled:
            return
        where = f"{event.prefix} {event.rank}" if event.rank else event.prefix
        if not self._tty:
            unit = "layer x rank shards" if event.rank else "layers"
            print(f"prepare: {where} done ({event.done_layers}/{event.total_layers} {unit}, "
                  f"{megabytes(event.done_bytes)} of {megabytes(event.total_bytes)})", file=self._stream, flush=True)
            return
        if self._bar is None:
            from tqdm import tqdm

            size = shutil.get_terminal_size()
            self._bar = tqdm(total=event.total_bytes / MB, initial=(event.done_bytes - event.nbytes) / MB,
                             unit="MB", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB "
                             "[{elapsed}<{remaining}] {postfix}", desc="prepare", file=self._stream,
                             # a terminal that reports no size (a fresh pty) would hide the bar
                             ncols=size.columns, nrows=size.lines)
        self._bar.set_postfix_str(where, refresh=False)
        self._bar.update(event.nbytes / MB)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
