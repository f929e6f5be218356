"""A server process whose content-hashing threads never finish, for shutdown tests: a call that uploads a layer
then waits in a server-side stage that nothing interrupts.

``python -m tests.helpers.blocked_server DRAIN_TIMEOUT`` prints the port, then serves until SIGTERM as
``nvfp4-prep serve`` does (``serve_until_signalled``), logging JSON to stderr.
"""

from __future__ import annotations

import sys
import threading

from nvfp4_prep.server import logs
from nvfp4_prep.server.config import ServeConfig
from nvfp4_prep.server.server import PrepServer, serve_until_signalled
from nvfp4_prep.server.service import HASH_THREADS


def main() -> int:
    logs.configure("INFO", "json")
    server = PrepServer(ServeConfig(host="127.0.0.1", port=0, devices=("cpu",), memory_budget=1 << 30,
                                    metrics_port=0, cache_bytes=64 << 20, drain_timeout=float(sys.argv[1]))).start()
    never = threading.Event()
    for _ in range(HASH_THREADS):
        server.service.hash_pool.submit(never.wait)
    print(server.port, flush=True)
    return serve_until_signalled(server)


if __name__ == "__main__":
    sys.exit(main())
