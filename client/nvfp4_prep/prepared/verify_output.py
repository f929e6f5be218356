"""``verify DIR --against SRC`` as a whole: the right verify for DIR, and whether DIR says it came from SRC.

DIR is a rank set (``nvfp4_prep_ranks.json``), or one prepared folder (whole layers or a single rank). The
manifest (or ranks file) records the source's path and file identity; when they are not the given
source's, the report says so before any difference, since a wrong ``--against`` explains them all. It is
a note, not a difference: a copy of the source elsewhere (another machine, a restored backup) has another
identity and the same bytes, and verify judges the bytes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from nvfp4_prep.checkpoint.checkpoint import Checkpoint, open_checkpoint
from nvfp4_prep.checkpoint.errors import CheckpointInvalid

from .manifest import MANIFEST_NAME, Manifest
from .rank_set import RANKS_NAME, RankSet, is_rank_set
from .rank_verify import verify_rank_set
from .verify import Difference, verify_prepared
from .writer import source_record


@dataclass(frozen=True)
class VerifyOutcome:
    """The differences, and ``note`` when DIR's record names another source than the one given."""

    note: str | None
    differences: list[Difference]


def source_note(out_dir: Path, source: Checkpoint) -> str | None:
    """None when DIR's recorded source is ``source`` (path and identity), else a line saying how it differs."""
    try:
        if is_rank_set(out_dir):
            record, named_by = RankSet.load(out_dir), RANKS_NAME
        else:
            record, named_by = Manifest.load(out_dir), MANIFEST_NAME
    except CheckpointInvalid:
        return None  # a difference of its own
    if record is None:
        return None
    recorded, given = record.source, source_record(source)
    if (recorded.get("path"), recorded.get("identity")) == (given["path"], given["identity"]):
        return None
    if recorded.get("path") == given["path"]:
        return (f"{named_by} names the source {given['path']} as it was when prepared (identity "
                f"{recorded.get('identity')}); its files have changed since (identity now {given['identity']})")
    return (f"{named_by} names another source: {recorded.get('path')} (identity {recorded.get('identity')}), not "
            f"the given {given['path']} (identity {given['identity']})")


def verify_output(out_dir: str | os.PathLike, against: str | os.PathLike | Checkpoint) -> VerifyOutcome:
    """Verifies DIR (a rank set or one prepared folder) against its source; see the module docstring."""
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as opened:
        source = against if isinstance(against, Checkpoint) else opened.enter_context(open_checkpoint(against))
        note = source_note(out_dir, source)
        check = verify_rank_set if is_rank_set(out_dir) else verify_prepared
        return VerifyOutcome(note, check(out_dir, source))
