"""Operating-system errors at the CLI boundary: one line naming the path, exit 3, no traceback, rerun resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nvfp4_prep.cli.checkpoint_commands import EXIT_OS_ERROR
from nvfp4_prep.prepared.manifest import MANIFEST_NAME
from nvfp4_prep.prepared.verify import verify_prepared

INDEX = "model.safetensors.index.json"
# The installed console script, nvfp4_prep.cli.main:entry (what `nvfp4-prep` runs), in a child process.
_ENTRY = "from nvfp4_prep.cli.main import entry; entry()"


def nvfp4_prep(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _ENTRY, *map(str, argv)], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)


def assert_os_error(result: subprocess.CompletedProcess, command: str, path: Path, errno_name: str) -> None:
    assert result.returncode == EXIT_OS_ERROR == 3, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nvfp4-prep {command}: {path}: ") and lines[0].endswith(f"(errno {errno_name})"), lines


def test_out_that_is_a_regular_file_exits_3_and_leaves_it_alone(tmp_path: Path, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"not a directory")
    result = nvfp4_prep("prepare", ct_checkpoint, "--out", out, "--quiet")
    assert_os_error(result, "prepare", out, "EEXIST")
    assert out.read_bytes() == b"not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written beside it

    out.unlink()  # the cause fixed, the same command succeeds
    rerun = nvfp4_prep("prepare", ct_checkpoint, "--out", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert verify_prepared(out, ct_checkpoint) == []


def test_out_that_cannot_be_created_exits_3(tmp_path: Path, ct_checkpoint: Path) -> None:
    if os.geteuid() != 0:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o500)
        out, errno_name = parent / "out", "EACCES"
    else:
        # Root ignores a directory's write bits (chmod 0o500 does not stop it), so the read-only case is
        # simulated by another real way of being unable to create --out: its parent is a regular file.
        parent = tmp_path / "plainfile"
        parent.write_bytes(b"x")
        out, errno_name = parent / "out", "ENOTDIR"
    try:
        result = nvfp4_prep("prepare", ct_checkpoint, "--out", out, "--quiet")
        assert_os_error(result, "prepare", out, errno_name)
        assert not out.exists()
    finally:
        if parent.is_dir():
            parent.chmod(0o700)


def test_os_error_mid_run_exits_3_and_a_rerun_resumes(tmp_path: Path, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    assert nvfp4_prep("prepare", ct_checkpoint, "--backend", "flashinfer_trtllm", "--out", out,
                      "--quiet").returncode == 0
    # A rerun with another backend (and --overwrite) rewrites every shard. The temporary file of the last shard (the one
    # holding the non-MoE tensors, written after the layers) is blocked by a directory of that name, so
    # opening it fails with a real EISDIR after the layer shards are written.
    last = sorted(out.glob("model-*.safetensors"))[-1]
    blocker = out / f".{last.name}.partial"
    blocker.mkdir()
    (blocker / "keep").write_bytes(b"")
    result = nvfp4_prep("prepare", ct_checkpoint, "--backend", "flashinfer_cutedsl", "--out", out, "--quiet",
                        "--overwrite")
    assert_os_error(result, "prepare", blocker, "EISDIR")
    assert not (out / INDEX).exists()  # never looks finished
    assert (out / MANIFEST_NAME).is_file()

    (blocker / "keep").unlink()
    blocker.rmdir()
    rerun = nvfp4_prep("prepare", ct_checkpoint, "--backend", "flashinfer_cutedsl", "--out", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "0 layers prepared, 2 kept from an earlier run" in rerun.stdout, rerun.stdout
    assert verify_prepared(out, ct_checkpoint) == []


def test_verify_os_error_exits_3_not_1(tmp_path: Path, ct_checkpoint: Path) -> None:
    out = tmp_path / "out"
    assert nvfp4_prep("prepare", ct_checkpoint, "--out", out, "--quiet").returncode == 0
    # A small file whose read fails in the kernel: /proc/self/mem is a regular file, and reading it at
    # offset 0 is a real EIO. The error carries no file name, so the line names DIR.
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to("/proc/self/mem")
    result = nvfp4_prep("verify", out, "--against", ct_checkpoint)
    assert_os_error(result, "verify", out, "EIO")
