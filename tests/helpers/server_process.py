"""``nvfp4-prep serve`` as a real subprocess on 127.0.0.1, port 0, for tests that kill it or read its log.

The server logs its bound port in JSON (the "serving" record's ``port``); the
log is collected line by line for the test to read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServerProcess:
    def __init__(self, *flags: str, env: dict[str, str] | None = None, startup_timeout: float = 120) -> None:
        command = [sys.executable, "-m", "nvfp4_prep.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--device", "cpu", "--memory-budget", "1GiB", "--metrics-port", "0", "--log-format", "json",
                   *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port = 0
        self._bound = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._bound.wait(startup_timeout) or not self.port:
            self.kill()
            raise RuntimeError("server did not start:\n" + self.log)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if not self.port and line.startswith("{"):
                record = json.loads(line)
                if record.get("port"):
                    self.port = int(record["port"])
                    self._bound.set()
        self._bound.set()  # the process ended

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def wait_for_log(self, predicate, timeout: float = 60) -> dict:
        """The first JSON log record for which ``predicate`` holds, waiting for it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for record in self.records():
                if predicate(record):
                    return record
            time.sleep(0.02)
        raise AssertionError("no such log record:\n" + self.log[-4000:])

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as on a node failure or an OOM kill."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
