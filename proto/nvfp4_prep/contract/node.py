"""Which node (and pod) a process runs on, for same-node delivery (``PrepareHeader.node_id``).

CUDA IPC handles and torch's shared-memory reference counters only open on the machine that made them, and in
a container only where ``/dev/shm`` is shared too: containers of one pod share it, and their hostname is the
pod's. So the id is the kernel's boot id (one per machine and boot) and the hostname; client and server compute
it with this one function so that the two sides compare the same thing.
"""

from __future__ import annotations

import socket
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def node_id() -> str:
    """``<boot id>/<hostname>``; empty when the boot id cannot be read (not Linux), which matches nothing."""
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        return ""
    return f"{boot}/{socket.gethostname()}" if boot else ""
