"""Reading one stacked layer from a safetensors file and writing its prepared form.

Used by ``nvfp4-prep layer``; the output follows SPEC section 7 (``<prefix>.<name>``
tensors, the layout record as JSON in the safetensors metadata) and appears
only once complete: it is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .result import RemoteLayer

# Same key as prepared checkpoints (nvfp4_prep.checkpoint.manifest.LAYOUT_METADATA_KEY).
LAYOUT_METADATA_KEY = "nvfp4_prep_layout"
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
    tensors = {lead + name: tensor.contiguous() for name, tensor in layer.tensors.items()}
    layout = dict(layer.layout, layer_prefix=prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata={LAYOUT_METADATA_KEY: json.dumps(layout, sort_keys=True)})
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
