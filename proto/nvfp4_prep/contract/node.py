"""Which node (and pod) a process runs on, for same-node delivery (``PrepareHeader.node_id``), and which process.

CUDA IPC handles and torch's shared-memory reference counters only open on the machine that made them, and in
a container only where ``/dev/shm`` is shared too: containers of one pod share it, and their hostname is the
pod's. So the id is the kernel's boot id (one per machine and boot) and the hostname; client and server compute
it with this one function so that the two sides compare the same thing.

A CUDA IPC handle does not open in the process that made it either, so a client also names its process
(``process_id``: pids repeat across a pod's containers, a random token does not).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROCESS: dict[int, str] = {}  # this process's token, by pid: a forked child makes its own


def node_id() -> str:
    """``<boot id>/<hostname>``; empty when the boot id cannot be read (not Linux), which matches nothing."""
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        return ""
    return f"{boot}/{socket.gethostname()}" if boot else ""


def process_id() -> str:
    """A token naming this process, the same for every call it makes."""
    pid = os.getpid()
    if pid not in _PROCESS:
        _PROCESS[pid] = uuid.uuid4().hex
    return _PROCESS[pid]
