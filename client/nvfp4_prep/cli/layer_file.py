"""Reading one stacked layer from a safetensors file and writing its prepared form.

Used by ``nvfp4-prep layer``; the output follows SPEC section 7 (``<prefix>.<name>``
tensors, the layout record as JSON in the safetensors metadata, in the same
form as a prepared checkpoint's shards) and appears only once complete: it is
written beside the target and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_prep.client.result import RemoteLayer
from nvfp4_prep.contract.dtypes import dtype_by_torch
from nvfp4_prep.contract.tensor_bytes import byte_view
from nvfp4_prep.prepared.manifest import LAYOUT_METADATA_KEY, split_layout
from nvfp4_prep.prepared.safetensors_writer import OutputTensor, write_safetensors

_LAYER_MARKER = "w13_weight"


def layer_prefixes(names: list[str]) -> list[str]:
    """Prefixes of the stacked layers in a file ("" for unprefixed names)."""
    return sorted({name[: -len(_LAYER_MARKER)].rstrip(".") for name in names
                   if name == _LAYER_MARKER or name.endswith("." + _LAYER_MARKER)})


def read_stacked_layer(path: Path, prefix: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(prefix, stacked tensors without the prefix) of the layer in ``path``.

    With ``prefix`` None the file must hold exactly one layer.
    """
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
        prefixes = layer_prefixes(names)
        if prefix is None:
            if len(prefixes) != 1:
                raise ValueError(f"{path}: holds {len(prefixes)} stacked layers {prefixes} "
                                 "(expected one, or name it with --prefix)")
            prefix = prefixes[0]
        elif prefix not in prefixes:
            raise ValueError(f"--prefix: {prefix!r} is not a stacked layer in {path} (it holds {prefixes})")
        lead = f"{prefix}." if prefix else ""
        tensors = {name[len(lead):]: handle.get_tensor(name) for name in names
                   if name.startswith(lead) and "." not in name[len(lead):]}
    return prefix, tensors


def write_prepared_layer(path: Path, prefix: str, layer: RemoteLayer) -> None:
    """Writes ``<prefix>.<name>`` tensors and the layout record; atomic (temp file, then rename)."""
    lead = f"{prefix}." if prefix else ""
    outputs = [OutputTensor(lead + name, dtype_by_torch(tensor.dtype).safetensors, tuple(tensor.shape),
                            byte_view(tensor))
               for name, tensor in layer.tensors.items()]
    shared, sizes = split_layout(layer.layout)
    record = {**shared, "layers": {prefix: sizes}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, outputs, {LAYOUT_METADATA_KEY: json.dumps(record, sort_keys=True)})
