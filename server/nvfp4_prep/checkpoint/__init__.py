"""Checkpoint side of nvfp4-prep: reading NVFP4 checkpoints, writing and verifying prepared ones."""

from .checkpoint import Checkpoint, open_checkpoint
from .errors import CheckpointError, CheckpointInvalid, CheckpointNotFound, CheckpointPermissionDenied

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointInvalid",
    "CheckpointNotFound",
    "CheckpointPermissionDenied",
    "open_checkpoint",
]
