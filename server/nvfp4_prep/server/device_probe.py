"""A cheap, periodic device check behind the liveness health name, so that a wedged CUDA context restarts the pod.

The gRPC thread answers health checks even when every CUDA call hangs (a GPU fault, an Xid, a lost device):
liveness on ``""`` alone would keep such a pod alive forever. ``DeviceProbe`` runs a tiny device operation on a
thread of its own every ``interval`` seconds; when it raises, or has not returned ``timeout`` seconds after it
began, the names it watches (``LIVENESS_NAME`` for the liveness probe, and the Prep service, so that readiness
takes the pod out of the Services at once) turn NOT_SERVING; a later check that succeeds turns them SERVING
again. A drain's ``enter_graceful_shutdown`` wins over both: the health servicer ignores later ``set`` calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

# The health service name the deployment's livenessProbe asks for.
LIVENESS_NAME = "liveness"
# Seconds between checks, and how long one may take before the device counts as wedged. The tiny operation
# runs on a stream of its own, so it does not wait for a long prepare kernel on the worker's stream.
PROBE_INTERVAL = 10.0
PROBE_TIMEOUT = 30.0

Check = Callable[[], None]


def cuda_check(device: torch.device) -> Check:
    """A check that adds two one-element tensors on ``device`` on a side stream and reads the result back."""
    stream = torch.cuda.Stream(device)

    def check() -> None:
        with torch.cuda.stream(stream):
            value = (torch.ones(1, device=device) + 1).item()  # .item() waits for the side stream only
        if value != 2.0:
            raise RuntimeError(f"{device}: 1 + 1 gave {value}")

    return check


def device_checks(devices: Iterable[torch.device]) -> list[Check]:
    """One check per CUDA device; none for the CPU, whose liveness is the process's own."""
    return [cuda_check(device) for device in devices if device.type == "cuda"]


class DeviceProbe:
    """Runs ``checks`` every ``interval`` seconds and mirrors their outcome into ``health`` for ``names``.

    With no checks (a CPU server) the names are SERVING and no thread starts. ``checks`` are plain callables
    that raise on failure, so that tests can hand in one that hangs.
    """

    def __init__(self, servicer: health.HealthServicer, checks: Sequence[Check], names: Sequence[str],
                 interval: float = PROBE_INTERVAL, timeout: float = PROBE_TIMEOUT) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError(f"interval and timeout must be positive seconds, got {interval} and {timeout}")
        self._health = servicer
        self._checks = list(checks)
        self._names = tuple(names)
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._healthy: bool | None = None
        self._watcher: threading.Thread | None = None

    def start(self) -> DeviceProbe:
        """Marks the names SERVING and, with checks to run, starts the watcher thread."""
        self._report(True, "")
        if self._checks:
            self._watcher = threading.Thread(target=self._watch, name="nvfp4-prep-device-probe", daemon=True)
            self._watcher.start()
        return self

    def stop(self) -> None:
        """Ends the watcher; a check still hanging is left behind on its daemon thread."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(self._interval + 1.0)

    def _watch(self) -> None:
        while not self._stop.is_set():
            done = threading.Event()
            failure: list[str] = []
            runner = threading.Thread(target=self._run_checks, args=(done, failure),
                                      name="nvfp4-prep-device-check", daemon=True)
            started = time.monotonic()
            runner.start()
            if not done.wait(self._timeout):
                self._report(False, f"device check has not returned after {self._timeout:.0f}s")
                # The device is wedged: wait for the hanging check (it may never return) before trying again.
                while not done.wait(self._interval):
                    if self._stop.is_set():
                        return
            self._report(not failure, failure[0] if failure else "")
            self._stop.wait(max(self._interval - (time.monotonic() - started), 0.0))

    def _run_checks(self, done: threading.Event, failure: list[str]) -> None:
        try:
            for check in self._checks:
                check()
        except Exception as err:  # any failure of the device call means the same: not live
            failure.append(f"device check failed: {type(err).__name__}: {err}")
        finally:
            done.set()

    def _report(self, healthy: bool, reason: str) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            self._health.set(name, status)
        previous, self._healthy = self._healthy, healthy
        if not healthy and previous is not False:
            log.error("%s: %s NOT_SERVING", reason, ", ".join(self._names))
        elif healthy and previous is False:
            log.warning("device check succeeded again: %s SERVING", ", ".join(self._names))
