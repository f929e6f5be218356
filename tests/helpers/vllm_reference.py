"""vLLM 0.33.0's own preparation code as a test reference, called from the main environment.

The reference (``tests/reference/vllm_moe.py``) runs under ``.venv-vllm/bin/python`` (built by
``.ci/env-vllm``): one process for the whole test session, started at the first call, fed one job per call
through temp safetensors files, so each call costs milliseconds after vLLM's import (about 30 s, once).
Without ``.venv-vllm`` the calling test is skipped, except under ``CI=true``, where it fails: CI must build it.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("NVFP4_PREP_VLLM_VENV", ROOT / ".venv-vllm"))
STARTUP_S = 600  # importing vLLM on a loaded 2-core machine; generous on purpose
JOB_S = 300


class VllmRefused(Exception):
    """vLLM 0.33.0 does not run this backend/activation/shape; the message is vLLM's own."""


def _python() -> Path:
    python = VENV / "bin" / "python"
    if not python.is_file():
        message = f"{VENV} is missing (vLLM 0.33.0 reference environment); build it with `.ci/env-vllm true`"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return python


class _Harness:
    """The reference process: JSON jobs on its stdin, JSON answers on a pipe, its own output in a log file."""

    def __init__(self, python: Path) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-reference-", suffix=".log", delete=False)
        read_fd, write_fd = os.pipe()
        self.process = subprocess.Popen(
            [str(python), "-m", "tests.reference.vllm_moe", str(write_fd)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            text=True,
        )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self.started = False
        self.lock = threading.Lock()

    def ask(self, job: dict) -> dict:
        with self.lock:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.replies], [], [], JOB_S if self.started else STARTUP_S)
            line = self.replies.readline() if ready else ""
            if not line:
                raise RuntimeError(f"the vLLM reference process gave no answer; its log:\n{self._log_tail()}")
            self.started = True
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the vLLM reference harness failed:\n{answer['error']}")
        return answer

    def _log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.replies.close()
        os.unlink(self.log.name)


_harness: _Harness | None = None


def _the_harness() -> _Harness:
    global _harness
    if _harness is None or _harness.process.poll() is not None:
        _harness = _Harness(_python())
        atexit.register(_harness.close)
    return _harness


def _run(kind: str, tensors: Mapping[str, torch.Tensor], **fields: str) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(prefix="vllm-reference-") as scratch:
        source, output = Path(scratch) / "in.safetensors", Path(scratch) / "out.safetensors"
        save_file({name: t.contiguous() for name, t in tensors.items()}, source)
        answer = _the_harness().ask({"kind": kind, "input": str(source), "output": str(output), **fields})
        if "refused" in answer:
            raise VllmRefused(answer["refused"])
        return load_file(output), answer["attrs"]


def vllm_prepare(tensors: Mapping[str, torch.Tensor], backend: str, activation: str) -> tuple[dict, dict]:
    """vLLM 0.33.0's ``process_weights_after_loading`` of one stacked layer (SPEC section 2 names).

    Returns the tensors the layer ends with (parameters, plus the quant config's g1_alphas, g2_alphas,
    a1_gscale, a2_gscale) and vLLM's sizes (hidden_dim, hidden_dim_unpadded, intermediate_size_per_partition,
    ..., the CuteDSL scale view's shape and strides). Raises VllmRefused with vLLM's message where it refuses.
    """
    return _run("prepare", tensors, backend=backend, activation=activation)


def vllm_swizzle(scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each float8 block-scale tensor: ``NAME.vllm`` (vLLM's swizzle_blockscale, flat) and ``NAME.p4``
    (the harness's stand-in for FlashInfer's CUDA block_scale_interleave), computed in the vLLM environment."""
    return _run("swizzle", scales)[0]
