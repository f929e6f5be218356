"""What every Prepare call of one server shares, handed to the call's collaborators as one object."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .admission import Admission
from .bounded_runner import BoundedRunner
from .cache import PreparedCache
from .metrics import Metrics
from .open_checkpoints import OpenCheckpoints


@dataclass(frozen=True)
class CallResources:
    admission: Admission
    cache: PreparedCache
    metrics: Metrics
    chunk_size: int
    allowed_roots: tuple[str, ...]
    hash_pool: ThreadPoolExecutor
    reads: BoundedRunner  # checkpoint opens and reads, bounded by each call's deadline
    checkpoints: OpenCheckpoints  # the checkpoints reference calls named, kept open
