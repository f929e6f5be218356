"""Small files of a checkpoint (configs, index, safetensors headers) read from descriptors at bounded cost.

Every file is opened ``O_NONBLOCK`` and must then be a regular file: a FIFO or a device as a shard or a
config would block its reader for ever, or never end. Sizes are bounded before anything is read, and
JSON is parsed so that every malformation (deep nesting and numbers too long to convert included) is a
CheckpointInvalid naming the file, never a RecursionError or ValueError escaping as an internal error.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from .errors import CheckpointInvalid, CheckpointNotFound, CheckpointPermissionDenied, shown

# config.json and hf_quant_config.json of real checkpoints weigh a few KB; their ignore lists a few
# thousand module names at most. Four MiB leaves two orders of magnitude.
MAX_CONFIG_BYTES = 4 << 20
# model.safetensors.index.json maps every tensor to its shard: about 100 bytes a tensor, so some 10 MB for
# the largest NVFP4 MoE models (Kimi-K2: 61 layers x 384 experts x 3 projections x 4 tensors = 281k).
MAX_INDEX_BYTES = 64 << 20

_KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket", stat.S_IFLNK: "symlink"}

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What a replacement of the file changes: device, inode, size, mtime and ctime (``cp -p`` keeps mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def require_regular(fd: int, display: str) -> os.stat_result:
    """The file's stat; CheckpointInvalid unless it is a regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        raise CheckpointInvalid(f"{shown(display)}: expected a regular file, found a {kind}")
    return st


def os_error(exc: OSError, what: str, display: str) -> Exception:
    """The checkpoint error for an OSError met opening or reading ``display``; names it, never the errno text alone."""
    where = f"{what} {shown(display)!r}"
    if exc.errno == errno.ENOENT:
        return CheckpointNotFound(f"{where} does not exist")
    if exc.errno == errno.ENOTDIR:
        return CheckpointNotFound(f"{where} does not exist (a component of it is not a directory)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointPermissionDenied(f"{where} cannot be opened: permission denied")
    if exc.errno == errno.ENAMETOOLONG:
        return CheckpointInvalid(f"{where}: a name in it is too long for the file system")
    return CheckpointInvalid(f"{where} cannot be read: {exc.strerror or type(exc).__name__}")


def read_bounded(fd: int, display: str, limit: int, what: str) -> bytes:
    """The whole regular file behind ``fd``, refused when it holds more than ``limit`` bytes."""
    st = require_regular(fd, display)
    if st.st_size > limit:
        raise CheckpointInvalid(f"{shown(display)}: {st.st_size} bytes, more than the {limit}-byte limit for a {what}")
    chunks, total = [], 0
    try:
        while total <= limit:  # the file may grow after fstat: read to its end, one byte past the limit at most
            chunk = os.pread(fd, limit + 1 - total, total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise os_error(exc, what, display) from None
    if total > limit:
        raise CheckpointInvalid(f"{shown(display)}: more than the {limit}-byte limit for a {what}")
    return b"".join(chunks)


def parse_json(raw: bytes, display: str, expected: str) -> object:
    """``raw`` decoded as UTF-8 JSON; every failure is a CheckpointInvalid naming the file and ``expected``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointInvalid(f"{shown(display)}: JSON nested too deeply; expected {expected}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and int() refusing a 5000-digit number
        raise CheckpointInvalid(
            f"{shown(display)}: not valid JSON ({shown(exc)}); expected UTF-8 JSON, {expected}") from None
