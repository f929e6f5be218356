"""The Dockerfile's install steps work: deploy/check-image-install runs its pip lines as written, with the hashed
locks, in a fresh virtual environment (the CPU torch in place of the CUDA one), and checks what they installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_install_steps_install_the_locks_and_the_server_runs():
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "check-image-install")], capture_output=True,
                            text=True, timeout=1500, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "pip install --require-hashes --no-deps -r deploy/requirements-torch.txt" in output
    assert "pip install --require-hashes --no-deps -r deploy/requirements-server.txt" in output
    assert "installed distributions are locked" in output
    assert "imports ok" in output and "image install steps: OK" in output
