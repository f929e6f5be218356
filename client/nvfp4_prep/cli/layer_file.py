"""Writing the layer that ``nvfp4-prep layer`` prepared (``layer_input`` reads what it sends).

The output follows SPEC section 7 (``<prefix>.<name>`` tensors, the layout record
as JSON in the safetensors metadata, in the same form as a prepared checkpoint's
shards) and appears only once complete: it is written beside the target and
renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvfp4_prep.client.result import RemoteLayer
from nvfp4_prep.contract.dtypes import dtype_by_torch
from nvfp4_prep.contract.tensor_bytes import byte_view
from nvfp4_prep.prepared.manifest import LAYOUT_METADATA_KEY, split_layout
from nvfp4_prep.prepared.safetensors_writer import OutputTensor, write_safetensors


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
