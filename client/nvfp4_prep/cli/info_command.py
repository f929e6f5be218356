"""``nvfp4-prep info``: what a server runs and offers (GetCapabilities and health), as a table or as JSON.

The table writes sizes in decimal units (``units.human_bytes``); ``--json`` writes every field, defaults
included, with exact byte counts as JSON numbers (protobuf's JSON mapping would make 64-bit integers
strings, which ``jq '.limits.chunk_size > 1e6'`` cannot compare).
"""

from __future__ import annotations

import argparse
import json
import sys

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .connection_flags import security_options
from .units import human_bytes

EXIT_USAGE, EXIT_FAILED = 2, 1
_INT64 = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def message_record(message: Message) -> dict:
    """``message`` (without map fields, as Capabilities is) as a JSON-ready dict: proto field names, every
    field, 64-bit integers as numbers."""
    record = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    _integers(message.DESCRIPTOR, record)
    return record


def _integers(descriptor: Descriptor, record: dict) -> None:
    for field in descriptor.fields:
        if field.name not in record:
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in record[field.name] if repeated else [record[field.name]]:
                _integers(field.message_type, item)
        elif field.type in _INT64:
            value = record[field.name]
            record[field.name] = [int(v) for v in value] if repeated else int(value)


def run_info(args: argparse.Namespace) -> int:
    from nvfp4_prep.client.errors import PrepClientError
    from nvfp4_prep.client.sdk import PrepClient

    try:
        security = security_options(args)
    except ValueError as err:
        print(f"nvfp4-prep info: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with PrepClient(args.server, timeout=args.timeout, retries=1, **security) as client:
            capabilities = client.capabilities()
            health = client.health()
    except (PrepClientError, ValueError) as err:
        print(f"nvfp4-prep info: {args.server}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({**message_record(capabilities), "health": health}, indent=2, sort_keys=True))
        return 0
    print(f"server            {args.server} ({health})")
    print(f"api               {capabilities.api}, package {capabilities.package_version}")
    print(f"torch             {capabilities.torch_version}")
    print(f"flashinfer        {capabilities.flashinfer_version or '-'}")
    print(f"pipeline          {capabilities.pipeline_version} "
          f"(FlashInfer layouts {capabilities.flashinfer_layout_version})")
    for device in capabilities.devices:
        cc = f", sm {device.compute_capability}" if device.compute_capability else ""
        print(f"device            {device.device}: {device.name}{cc}, budget {human_bytes(device.memory_budget_bytes)}")
    for backend in capabilities.backends:
        print(f"backend           {backend.backend}: {', '.join(backend.layout_versions)}")
    print(f"activations       {', '.join(capabilities.activations)}")
    print(f"scale policies    {', '.join(capabilities.input_scale_policies)}")
    print(f"checkpoint refs   {'yes' if capabilities.checkpoint_refs else 'no'}")
    limits = capabilities.limits
    cache = human_bytes(limits.cache_bytes) if limits.cache_bytes else "off"
    print(f"limits            chunk {human_bytes(limits.chunk_size)}, receive "
          f"{human_bytes(limits.max_receive_message_bytes)}, request {human_bytes(limits.max_request_bytes)}, "
          f"cache {cache}")
    per_client = limits.max_concurrent_per_client or "no limit"
    tensor_bound = f" and <= {human_bytes(limits.max_tensor_bytes)}" if limits.max_tensor_bytes else ""
    print(f"                  {limits.max_tensors} tensors of rank <= {limits.max_tensor_rank}{tensor_bound}, "
          f"{limits.max_concurrent} calls at once ({per_client} per client), {limits.max_deadline_seconds:g} s each")
    return 0
