"""A client process for the CUDA IPC tests: CUDA IPC handles open only in another process than the one that made them.

    python -m tests.helpers.ipc_client ADDRESS MODE DEVICE OUT

The layer is ``LAYER`` (random, seeded), so the test builds the same one to compare with. Modes:

- ``take``: ``PrepClient.prepare_layer(..., delivery="cuda_ipc", device=DEVICE)``; saves the tensors (on the CPU) to
  OUT with ``torch.save`` and prints ``taken``. ``take-bulk``: the same from a client that also offers the bulk
  transport (``bulk_streams=2``), which the upload then takes. ``take-out``: the same into tensors this process
  allocated on DEVICE (``out=``: one copy per tensor, where ``device=`` lands the packed layer in one).
- ``hold``: a raw call that opens every handle, prints ``opened`` and waits to be killed (a client that dies with
  the server's memory mapped, before it took the layer).
- ``wait``: a raw call that opens nothing and never takes the layer; prints ``handed``, then the call's end as a
  JSON line ``{"code", "details"}``.
"""

from __future__ import annotations

import json
import sys
import time

import grpc
import torch

from nvfp4_prep.client import PrepClient
from nvfp4_prep.client.ipc import HeldRequests
from nvfp4_prep.client.sdk import header_options
from nvfp4_prep.contract.node import node_id
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import encode_tensors, header_for
from tests.helpers.layer_factory import random_layer

BACKEND = "flashinfer_cutlass"
LAYER = {"experts": 4, "hidden": 1024, "inter": 256, "gated": True, "seed": 11}


def layer() -> dict[str, torch.Tensor]:
    return random_layer(**LAYER)


def take(address: str, device: str, out: str, bulk_streams: int = 0, into: bool = False) -> None:
    with PrepClient(address, timeout=120, bulk_streams=bulk_streams) as client:
        if into:  # the shapes and dtypes of the answer, from a streamed one
            shapes = client.prepare_layer(layer(), BACKEND).tensors
            mine = {name: torch.full_like(tensor, 7, device=device) for name, tensor in shapes.items()}
            client.prepare_layer(layer(), BACKEND, delivery="cuda_ipc", out=mine)
            got = mine
        else:
            got = client.prepare_layer(layer(), BACKEND, delivery="cuda_ipc", device=device).tensors
    assert all(tensor.device == torch.device(device) for tensor in got.values())
    torch.save({name: tensor.cpu() for name, tensor in got.items()}, out)
    print("taken", flush=True)


def raw(address: str, mode: str, device: str) -> None:
    tensors = layer()
    header = pb.PrepareHeader(backend=BACKEND, activation="swiglu", input_scale_policy="max", **header_options(),
                              tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                                   tensors=[header_for(n, t) for n, t in tensors.items()]),
                              delivery=pb.DELIVERY_CUDA_IPC, node_id=node_id())
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(tensors, 1 << 20))]))
    call = prep_pb2_grpc.PrepStub(grpc.insecure_channel(address)).Prepare(held, timeout=120)
    next(call)  # the header
    handles = next(call).ipc
    if mode == "hold":
        index = torch.device(device).index
        torch.cuda.init()  # as the SDK does before it opens handles
        opened = [torch.UntypedStorage._new_shared_cuda(
            index, t.storage_handle, t.storage_size_bytes, t.storage_offset_bytes, t.ref_counter_handle,
            t.ref_counter_offset, t.event_handle, t.event_sync_required) for t in handles.tensors if t.storage_handle]
        print("opened", len(opened), flush=True)
        time.sleep(600)
        return
    print("handed", flush=True)
    try:
        for _ in call:
            pass
        print(json.dumps({"code": "OK", "details": ""}), flush=True)
    except grpc.RpcError as err:
        print(json.dumps({"code": err.code().name, "details": err.details()}), flush=True)


if __name__ == "__main__":
    address, mode, device, out = sys.argv[1:5]
    if mode in ("take", "take-bulk", "take-out"):
        take(address, device, out, bulk_streams=2 if mode == "take-bulk" else 0, into=mode == "take-out")
    else:
        raw(address, mode, device)
