"""A set of rank folders: one complete prepared checkpoint per tensor- and expert-parallel rank (SPEC section 11).

``prepare --tp-size N --ep-size M`` writes ``DIR/tp{t}of{N}-ep{e}of{M}/`` for every rank, each an ordinary
prepared checkpoint (its own manifest, shards, config and tokenizer files) whose layout record names the
shard, plus ``DIR/nvfp4_prep_ranks.json`` listing the folders, so that a tool (verify, a loader) finds the
set and an engine rank finds its folder by name. Preparing a rank's bytes from the whole layer is the
pipeline's job; this module owns the top-level directory: naming, the ranks file, and what may be replaced.
A set is written into a directory only when it is empty or missing, or holds a set (or a prepared
checkpoint) of ours; another source, other options or other sizes are replaced only with ``overwrite``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointInvalid
from nvfp4_prep.contract.layout import layout_id

from .atomic_file import partial_path, remove_partials, write_bytes_atomic
from .manifest import MANIFEST_NAME, read_versioned_json

log = logging.getLogger(__name__)

RANKS_NAME = "nvfp4_prep_ranks.json"
RANKS_FORMAT = "nvfp4-prep-ranks"
RANKS_VERSION = 1

def rank_folder_name(tp_rank: int, tp_size: int, ep_rank: int, ep_size: int) -> str:
    """``tp1of2-ep0of4``: the rank's coordinates and the set's sizes, so two sets never share a folder name."""
    return f"tp{tp_rank}of{tp_size}-ep{ep_rank}of{ep_size}"


@dataclass(frozen=True)
class Rank:
    """One rank of a set: its coordinates and folder name."""

    tp_rank: int
    ep_rank: int
    folder: str

    def shard_options(self, tp_size: int, ep_size: int, placement: str) -> dict:
        """The shard keywords of ``pipeline.prepare`` / ``PrepClient.prepare_layer`` for this rank."""
        return {"tp_rank": self.tp_rank, "tp_size": tp_size, "ep_rank": self.ep_rank, "ep_size": ep_size,
                "expert_placement": placement}


def set_ranks(tp_size: int, ep_size: int) -> list[Rank]:
    """Every rank of a ``tp_size`` x ``ep_size`` set, tensor-parallel rank first."""
    return [Rank(tp, ep, rank_folder_name(tp, tp_size, ep, ep_size))
            for tp in range(tp_size) for ep in range(ep_size)]


@dataclass
class RankSet:
    """In-memory form of ``nvfp4_prep_ranks.json``; ``request`` holds backend, activation, policy and options."""

    source: dict
    request: dict
    tp_size: int
    ep_size: int
    expert_placement: str
    complete: bool = False
    ranks: list[Rank] = field(init=False)

    def __post_init__(self) -> None:
        self.ranks = set_ranks(self.tp_size, self.ep_size)

    def key(self) -> tuple:
        """What must match for a rerun to resume the set rather than replace it."""
        return self.source, self.request, self.tp_size, self.ep_size, self.expert_placement

    def rank_layout_id(self, rank: Rank) -> str:
        request = self.request
        return layout_id(request["backend"], profile=request.get("profile", "seed"),
                         activation=request["activation"], policy=request["input_scale_policy"],
                         gated_group_size=request.get("gated_group_size", 64),
                         **rank.shard_options(self.tp_size, self.ep_size, self.expert_placement))

    def to_json(self) -> dict:
        return {"format": RANKS_FORMAT, "version": RANKS_VERSION, "complete": self.complete,
                "source": self.source, "request": self.request, "tp_size": self.tp_size, "ep_size": self.ep_size,
                "expert_placement": self.expert_placement,
                "ranks": [{"folder": rank.folder, "tp_rank": rank.tp_rank, "ep_rank": rank.ep_rank,
                           "layout_id": self.rank_layout_id(rank)} for rank in self.ranks]}

    def save(self, directory: Path) -> None:
        write_bytes_atomic(directory / RANKS_NAME, json.dumps(self.to_json(), indent=1).encode("utf-8"))

    @classmethod
    def load(cls, directory: Path) -> RankSet | None:
        """The ranks file in ``directory``, None when there is none; CheckpointInvalid naming the bad field."""
        path = Path(directory) / RANKS_NAME
        data = read_versioned_json(path, RANKS_FORMAT, RANKS_VERSION)
        if data is None:
            return None
        for key in ("source", "request"):
            if not isinstance(data.get(key), dict):
                raise CheckpointInvalid(f"{path}: {key} is not an object")
        for key in ("tp_size", "ep_size"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointInvalid(f"{path}: {key} is {value!r}, expected an integer >= 1")
        if not isinstance(data.get("expert_placement"), str):
            raise CheckpointInvalid(f"{path}: expert_placement is {data.get('expert_placement')!r}, expected a name")
        return cls(data["source"], data["request"], data["tp_size"], data["ep_size"], data["expert_placement"],
                   data.get("complete") is True)


def is_rank_set(directory: str | os.PathLike) -> bool:
    return (Path(directory) / RANKS_NAME).is_file()


def remove_rank_set(directory: Path, previous: RankSet, keep: frozenset[str] = frozenset()) -> None:
    """Deletes the rank folders ``previous`` lists (those holding our manifest; not ``keep``) and the ranks file."""
    for rank in previous.ranks:
        folder = directory / rank.folder
        if rank.folder in keep or not folder.is_dir() or folder.is_symlink():
            continue
        if not (folder / MANIFEST_NAME).is_file():
            log.warning("%s holds no %s; left in place", folder, MANIFEST_NAME)
            continue
        shutil.rmtree(folder)
        log.info("removed rank folder %s of the earlier set", folder)
    (directory / RANKS_NAME).unlink(missing_ok=True)


class RankSetLock:
    """An exclusive flock on a set's top directory for as long as it is held; CheckpointError when taken."""

    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise CheckpointError(f"{directory} is being written by another prepare run") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RankSetLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RankSetDirectory:
    """Owns the top of a set's output directory for one run (an exclusive flock); use as a context manager.

    Opening it decides whether the directory may be written (see the module docstring), removes what
    ``overwrite`` replaces, and saves the ranks file marked incomplete; ``finish`` marks it complete.
    """

    def __init__(self, out_dir: str | os.PathLike, source_dir: str | os.PathLike, wanted: RankSet,
                 overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir).absolute()
        if os.path.realpath(self.out_dir) == os.path.realpath(source_dir):
            raise CheckpointInvalid(
                f"output directory {self.out_dir} is the source checkpoint; expected another directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RankSetLock(self.out_dir)
        try:
            self.rank_set = wanted
            self._claim(overwrite)
            remove_partials(self.out_dir)
            wanted.complete = False
            wanted.save(self.out_dir)
        except BaseException:
            self.close()
            raise

    def _claim(self, overwrite: bool) -> None:
        try:
            previous = RankSet.load(self.out_dir)
        except CheckpointInvalid as exc:
            raise CheckpointInvalid(
                f"output directory {self.out_dir} holds a {RANKS_NAME} that is not a prepare run's ({exc}); "
                "expected an empty directory or one written by nvfp4-prep prepare") from None
        wanted = self.rank_set
        if previous is not None:
            if previous.key() == wanted.key():
                return  # a rerun: each rank folder's writer keeps what is written and verified
            if not overwrite:
                what = "another source" if previous.source != wanted.source else "other options or rank sizes"
                raise CheckpointInvalid(
                    f"output directory {self.out_dir} holds a rank set made from {what} (source "
                    f"{previous.source.get('path')!r}, tp_size {previous.tp_size}, ep_size {previous.ep_size}, "
                    f"placement {previous.expert_placement}, options {previous.request}); pass --overwrite to "
                    "replace it, or choose another --out")
            # Folders of the same name are rewritten in place by their writers (they refuse nothing under
            # overwrite); the others would be strays of the old set.
            remove_rank_set(self.out_dir, previous, keep=frozenset(rank.folder for rank in wanted.ranks))
            return
        if (self.out_dir / MANIFEST_NAME).is_file():
            if not overwrite:
                raise CheckpointInvalid(
                    f"output directory {self.out_dir} holds a single prepared checkpoint ({MANIFEST_NAME}); pass "
                    "--overwrite to replace it with a rank set, or choose another --out")
            for path in self.out_dir.iterdir():  # ours: its manifest says so; folders inside are left alone
                if path.is_file() or path.is_symlink():
                    path.unlink()
            return
        first_save = partial_path(self.out_dir / RANKS_NAME).name
        wanted_folders = {rank.folder for rank in wanted.ranks}
        present = sorted(path.name for path in self.out_dir.iterdir()
                         if path.name != first_save and not (path.name in wanted_folders and path.is_dir()
                                                             and not any(path.iterdir())))
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise CheckpointInvalid(
                f"output directory {self.out_dir} is not empty ({shown}) and has no {RANKS_NAME}; expected an "
                "empty or missing directory, or one written by nvfp4-prep prepare (refusing to delete files in it)")

    def finish(self) -> None:
        self.rank_set.complete = True
        self.rank_set.save(self.out_dir)

    def close(self) -> None:
        self._lock.close()

    def __enter__(self) -> RankSetDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
