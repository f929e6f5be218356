"""Index maps that write each output tensor in one pass, cached per shape and backend.

Every output of a backend is a pure gather: output row ``r`` of every expert
takes input row ``src[r]`` (``-1`` for zero padding). Weight rows are moved as
int64 words; block scales, after the 128x4 tiling of SPEC P4, are moved as the
widest word (4, 2 or 1 bytes) that keeps a scale quad together. The maps do
not depend on the expert count or the data, so one cached plan serves every
layer of a model.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import profiles, rowmaps
from .layout import LayerDims
from .swizzle import tile_offsets, tiled_shape

WEIGHT_WORD = torch.int64
SCALE_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass(frozen=True, eq=False)
class ScaleTiles:
    """The row gather and 128x4 tiling that a flat scale map folds together, kept apart for a tiled kernel.

    One word is a quad of scales (four columns of one row), so tile column ``k`` of row band ``b`` holds,
    for rows ``32 i + j`` of the band, words at ``j * 4 + i`` of its 128 (SPEC P4).
    """

    rows: torch.Tensor  # source row of each output row, -1 for padding, padded to whole 128-row tiles
    words_per_row: int  # quads per source row
    col_tiles: int  # tile columns per row band (padding included)


@dataclass(eq=False)
class GatherPlan:
    """``out[:, r, :in_cols] = in[:, src[r], :]``; rows with ``src < 0`` and columns past ``in_cols`` are zero."""

    word: torch.dtype
    in_rows: int
    in_cols: int
    out_rows: int
    out_cols: int
    src: torch.Tensor
    tiles: ScaleTiles | None = None
    inverse: torch.Tensor = field(init=False)
    padding: torch.Tensor = field(init=False)
    _on_device: dict = field(init=False, default_factory=dict, repr=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        valid = self.src >= 0
        self.inverse = torch.empty(self.in_rows, dtype=torch.long)
        self.inverse[self.src[valid]] = valid.nonzero().flatten()
        self.padding = (~valid).nonzero().flatten()

    def maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src, inverse, padding) on ``device``, copied there once."""
        return self._cached(device, "maps", lambda: tuple(m.to(device) for m in (self.src, self.inverse, self.padding)))

    def tile_rows(self, device: torch.device) -> torch.Tensor:
        """``tiles.rows`` on ``device``, copied there once (tiled plans only)."""
        return self._cached(device, "tile_rows", lambda: self.tiles.rows.to(device))

    def _cached(self, device: torch.device, what: str, make: Callable[[], object]):
        key = (str(device), what)
        with self._lock:
            if key not in self._on_device:
                self._on_device[key] = make()
            return self._on_device[key]


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """The four gathers of a layer and the per-expert byte shapes they produce."""

    w13: GatherPlan
    s13: GatherPlan
    w2: GatherPlan
    s2: GatherPlan
    w13_shape: tuple[int, int]
    s13_shape: tuple[int, int]
    w2_shape: tuple[int, int]
    s2_shape: tuple[int, int]


def gemm1_rows(backend: str, activation: str, dims: LayerDims, profile: str = "seed",
               gated_group_size: int = 64) -> torch.Tensor:
    """Source row of every prepared W13/S13 row (SPEC section 5, GEMM1 column; section 10 for the profile)."""
    inter, inter_padded = dims.intermediate, dims.intermediate_padded
    padded = torch.full((dims.n1_padded,), -1, dtype=torch.long)
    if dims.gated:
        order = profiles.gated_order(backend, activation, 2 * inter, profile)
        padded[:inter] = order[:inter]
        padded[inter_padded:inter_padded + inter] = order[inter:]
    else:
        padded[:inter] = torch.arange(inter, dtype=torch.long)
    if backend == "flashinfer_cutedsl" and dims.gated:
        return padded[rowmaps.interleave_groups(dims.n1_padded, gated_group_size)]
    if backend == "flashinfer_trtllm":
        return padded[rowmaps.trtllm_gemm1(dims.n1_padded, dims.gated)]
    return padded


def gemm2_rows(backend: str, dims: LayerDims) -> torch.Tensor:
    """Source row of every prepared W2/S2 row."""
    rows = torch.arange(dims.hidden_padded, dtype=torch.long)
    rows[dims.hidden:] = -1
    if backend == "flashinfer_trtllm":
        return rows[rowmaps.trtllm_shuffle(dims.hidden_padded)]
    return rows


def _weight_plan(rows: torch.Tensor, in_rows: int, in_bytes: int, out_bytes: int) -> GatherPlan:
    word = torch.iinfo(WEIGHT_WORD).bits // 8
    return GatherPlan(WEIGHT_WORD, in_rows, in_bytes // word, len(rows), out_bytes // word, rows)


def _scale_plan(rows: torch.Tensor, in_rows: int, in_cols: int, out_cols: int) -> tuple[GatherPlan, tuple[int, int]]:
    """Row gather, column padding and 128x4 tiling folded into one flat map."""
    tiled_rows, tiled_cols = tiled_shape(len(rows), out_cols)
    width = next(w for w in SCALE_WORDS if in_cols % w == 0)
    dest = tile_offsets(len(rows), in_cols, tiled_cols)[:, ::width] // width
    words_per_row = in_cols // width
    source = rows.unsqueeze(1) * words_per_row + torch.arange(words_per_row, dtype=torch.long)
    valid = (rows >= 0).unsqueeze(1).expand_as(dest)
    flat = torch.full((tiled_rows * tiled_cols // width,), -1, dtype=torch.long)
    flat[dest[valid]] = source[valid]
    tiles = None
    if width == 4:
        band_rows = torch.full((tiled_rows,), -1, dtype=torch.long)
        band_rows[:len(rows)] = rows
        tiles = ScaleTiles(band_rows, words_per_row, tiled_cols // 4)
    plan = GatherPlan(SCALE_WORDS[width], in_rows * words_per_row, 1, len(flat), 1, flat, tiles)
    return plan, (tiled_rows, tiled_cols)


@functools.lru_cache(maxsize=64)
def layer_plan(backend: str, activation: str, dims: LayerDims, profile: str = "seed",
               gated_group_size: int = 64) -> LayerPlan:
    """The cached plan for one (backend, activation, shape, profile, group size)."""
    rows1 = gemm1_rows(backend, activation, dims, profile, gated_group_size)
    rows2 = gemm2_rows(backend, dims)
    hidden, hidden_p = dims.hidden, dims.hidden_padded
    inter, inter_p = dims.intermediate, dims.intermediate_padded
    s13, s13_shape = _scale_plan(rows1, dims.n1, hidden // 16, hidden_p // 16)
    s2, s2_shape = _scale_plan(rows2, hidden, inter // 16, inter_p // 16)
    return LayerPlan(
        w13=_weight_plan(rows1, dims.n1, hidden // 2, hidden_p // 2),
        s13=s13,
        w2=_weight_plan(rows2, hidden, inter // 2, inter_p // 2),
        s2=s2,
        w13_shape=(dims.n1_padded, hidden_p // 2),
        s13_shape=s13_shape,
        w2_shape=(hidden_p, inter_p // 2),
        s2_shape=s2_shape,
    )
