"""The manifest of a prepared checkpoint (``nvfp4_prep_manifest.json``).

It records what was asked for (source, backend, activation, policy), the layout
record (the fields shared by all layers plus each layer's padded and unpadded
sizes) and, per finished shard, what it holds with a CRC32C per tensor. A shard is
done only once the manifest lists it; the manifest is rewritten atomically after
every shard, so it never claims more than is on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nvfp4_prep.checkpoint.errors import CheckpointInvalid
from nvfp4_prep.contract.layout import QUANTIZED_LAYOUT_KEYS

from .atomic_file import write_bytes_atomic

MANIFEST_NAME = "nvfp4_prep_manifest.json"
MANIFEST_FORMAT = "nvfp4-prep-manifest"
MANIFEST_VERSION = 1
LAYOUT_METADATA_KEY = "nvfp4_prep_layout"

# Fields of a layer's layout record that are the same for every layer of one run.
SHARED_LAYOUT_KEYS = ("layout_id", "backend", "activation", "input_scale_policy", "pipeline_version",
                      "flashinfer_layout_version", "epilogue_tile_m", "sf_vec_size", "profile", "flashinfer_release",
                      "gated_group_size", "padding_fill_byte", "hidden_alignment", "intermediate_alignment",
                      "tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement")


def read_versioned_json(path: Path, format_name: str, version: int) -> dict | None:
    """One of our JSON records (manifest, ranks file), None when absent; CheckpointInvalid when it is not valid
    JSON or names another format or version."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointInvalid(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise CheckpointInvalid(f"{path}: format is not {format_name!r}")
    if data.get("version") != version:
        raise CheckpointInvalid(f"{path}: version {data.get('version')!r}, expected {version}")
    return data


def split_layout(layout: dict) -> tuple[dict, dict]:
    """A layer's layout record as (fields shared by all layers, this layer's sizes); the fields of a quantized
    layer (``QUANTIZED_LAYOUT_KEYS``) are shared too, and present only when the layer was quantized."""
    shared = {key: layout.get(key) for key in SHARED_LAYOUT_KEYS}
    shared |= {key: layout[key] for key in QUANTIZED_LAYOUT_KEYS if key in layout}
    own = {key: value for key, value in layout.items() if key not in (*SHARED_LAYOUT_KEYS, *QUANTIZED_LAYOUT_KEYS)}
    return shared, own


@dataclass
class Manifest:
    """In-memory form of the manifest; see the module docstring."""

    source: dict
    request: dict
    layout: dict = field(default_factory=dict)          # shared layout fields, empty until a layer is written
    layers: dict[str, dict] = field(default_factory=dict)  # prefix -> that layer's sizes
    shards: dict[str, dict] = field(default_factory=dict)  # filename -> layer, other_tensors, size, tensors
    complete: bool = False

    def layer_layout(self, prefix: str) -> dict:
        """The full layout record of one layer, as ``unprepare`` takes it."""
        return {**self.layout, **self.layers[prefix]}

    def layout_record(self, prefixes: list[str]) -> dict:
        """The record stored in shard metadata: shared fields plus the named layers' sizes."""
        return {**self.layout, "layers": {prefix: self.layers[prefix] for prefix in prefixes}}

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": self.complete,
            "source": self.source, "request": self.request,
            "layout": self.layout_record(sorted(self.layers)), "shards": self.shards,
        }

    def save(self, directory: Path) -> None:
        write_bytes_atomic(directory / MANIFEST_NAME, json.dumps(self.to_json(), indent=1).encode("utf-8"))

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        """The manifest in ``directory``, None when there is none; CheckpointInvalid when malformed."""
        path = directory / MANIFEST_NAME
        data = read_versioned_json(path, MANIFEST_FORMAT, MANIFEST_VERSION)
        if data is None:
            return None
        parts = {key: data.get(key) for key in ("source", "request", "layout", "shards")}
        for key, value in parts.items():
            if not isinstance(value, dict):
                raise CheckpointInvalid(f"{path}: {key} is not an object")
        layout = dict(parts["layout"])
        layers = layout.pop("layers", {})
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise CheckpointInvalid(f"{path}: layout.layers is not an object of layer records")
        for name, shard in parts["shards"].items():
            if not isinstance(shard, dict) or not isinstance(shard.get("tensors"), dict):
                raise CheckpointInvalid(f"{path}: shards.{name} has no tensors object")
        return cls(parts["source"], parts["request"], layout, layers, parts["shards"], data.get("complete") is True)
