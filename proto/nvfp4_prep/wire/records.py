"""The layout record and derived scalars: Python dicts <-> their proto messages.

Both directions walk the message descriptors, so the proto is the one list of
fields; a layout record missing a field fails loudly instead of travelling short.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nvfp4_prep.contract.layout import QUANTIZED_LAYOUT_KEYS
from nvfp4_prep.v1 import prep_pb2 as pb

from .errors import FramingError

LAYOUT_FIELDS: tuple[str, ...] = tuple(field.name for field in pb.Layout.DESCRIPTOR.fields)
SCALAR_NAMES: tuple[str, ...] = tuple(field.name for field in pb.DerivedScalars.DESCRIPTOR.fields)


ENGINE_FIELDS: tuple[str, ...] = tuple(field.name for field in pb.EngineConfig.DESCRIPTOR.fields)


def layout_to_proto(layout: Mapping) -> pb.Layout:
    """Every field but those of ``QUANTIZED_LAYOUT_KEYS`` must be in ``layout`` (those: only for a quantized layer)."""
    missing = [name for name in LAYOUT_FIELDS if name not in layout and name not in QUANTIZED_LAYOUT_KEYS]
    if missing:
        raise KeyError(f"layout record lacks {missing}")
    fields = {name: layout[name] for name in LAYOUT_FIELDS if name != "engine_config" and name in layout}
    engine = layout["engine_config"]
    if engine is not None:  # None: the profile records nothing on the engine's layer
        fields["engine_config"] = pb.EngineConfig(**engine)
    return pb.Layout(**fields)


def layout_from_proto(message: pb.Layout) -> dict:
    record = {name: getattr(message, name) for name in LAYOUT_FIELDS
              if name != "engine_config" and (name not in QUANTIZED_LAYOUT_KEYS or getattr(message, name))}
    record["expert_ids"] = list(message.expert_ids)
    record["engine_config"] = ({name: getattr(message.engine_config, name) for name in ENGINE_FIELDS}
                               if message.HasField("engine_config") else None)
    return record


def scalars_to_proto(tensors: Mapping[str, torch.Tensor]) -> pb.DerivedScalars:
    """The derived scalars of a prepared layer (CPU or device tensors)."""
    return pb.DerivedScalars(**{
        name: tensors[name].detach().to("cpu", torch.float32).reshape(-1).tolist() for name in SCALAR_NAMES
    })


def check_scalars(message: pb.DerivedScalars, tensors: Mapping[str, torch.Tensor], field: str) -> None:
    """Raises unless each scalar list equals, bit for bit, the tensor of the same name."""
    for name in SCALAR_NAMES:
        if name not in tensors:
            raise FramingError(f"{field}.{name}", "has no tensor of that name", f"a prepared tensor {name}")
        listed = torch.tensor(list(getattr(message, name)), dtype=torch.float32)
        tensor = tensors[name].reshape(-1)
        if tensor.dtype != torch.float32 or not torch.equal(listed.view(torch.int32), tensor.view(torch.int32)):
            raise FramingError(f"{field}.{name}", "differs from the streamed tensor", "the same float32 values")
