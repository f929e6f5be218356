"""A client process for the CUDA IPC tests: CUDA IPC handles open only in another process than the one that made them.

    python -m tests.helpers.ipc_client ADDRESS MODE DEVICE OUT

The layer is ``LAYER`` (random, seeded), so the test builds the same one to compare with. Modes:

- ``take``: ``PrepClient.prepare_layer(..., delivery="cuda_ipc", device=DEVICE)``; saves the tensors (on the CPU) to
  OUT with ``torch.save`` and prints ``taken``. ``take-bulk``: the same from a client that also offers the bulk
  transport (``bulk_streams=2``), which the upload then takes. ``take-out``: the same into tensors this process
  allocated on DEVICE (``out=``: one copy per tensor, where ``device=`` lands the packed layer in one).
  When DEVICE is the server's GPU, the server writes the layer into this process's tensors instead.
- ``again``: ``take-out`` twice into the same tensors (filled with 7 again in between), printing ``first`` and
  waiting for a line on stdin before the second call; saves the second answer.
- ``hold``: a raw call that opens every handle, prints ``opened`` and waits to be killed (a client that dies with
  the server's memory mapped, before it took the layer).
- ``wait``: a raw call that opens nothing and never takes the layer; prints ``handed``, then the call's end as a
  JSON line ``{"code", "details", "field"}``. ``wait-write``: the same for a call naming DEVICE as its GPU, which
  the server asks for destinations (prints ``asked``) and never gets them.
- ``overrun``: a call naming DEVICE as its GPU whose first destination claims a storage far larger than the
  tensor this process allocated for it; prints the call's end as that JSON line.
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
from nvfp4_prep.contract.node import node_id, process_id
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import encode_tensors, header_for, read_headers
from tests.helpers.layer_factory import random_layer

BACKEND = "flashinfer_cutlass"
LAYER = {"experts": 4, "hidden": 1024, "inter": 256, "gated": True, "seed": 11}


def layer() -> dict[str, torch.Tensor]:
    return random_layer(**LAYER)


def take(address: str, device: str, out: str, bulk_streams: int = 0, into: bool = False, again: bool = False
         ) -> None:
    with PrepClient(address, timeout=120, bulk_streams=bulk_streams) as client:
        if into:  # the shapes and dtypes of the answer, from a streamed one
            shapes = client.prepare_layer(layer(), BACKEND).tensors
            mine = {name: torch.full_like(tensor, 7, device=device) for name, tensor in shapes.items()}
            client.prepare_layer(layer(), BACKEND, delivery="cuda_ipc", out=mine)
            if again:
                for tensor in mine.values():
                    tensor.fill_(7)
                print("first", flush=True)
                sys.stdin.readline()
                client.prepare_layer(layer(), BACKEND, delivery="cuda_ipc", out=mine)
            got = mine
        else:
            got = client.prepare_layer(layer(), BACKEND, delivery="cuda_ipc", device=device).tensors
    assert all(tensor.device == torch.device(device) for tensor in got.values())
    torch.save({name: tensor.cpu() for name, tensor in got.items()}, out)
    print("taken", flush=True)


def _end(call) -> None:
    """Prints how ``call`` ended, as a JSON line."""
    try:
        for _ in call:
            pass
        print(json.dumps({"code": "OK", "details": "", "field": ""}), flush=True)
    except grpc.RpcError as err:
        field = dict(err.trailing_metadata() or ()).get("nvfp4-prep-field", "")
        print(json.dumps({"code": err.code().name, "details": err.details(), "field": field}), flush=True)


def raw(address: str, mode: str, device: str) -> None:
    tensors = layer()
    written = mode in ("wait-write", "overrun")  # name this process's GPU: the server asks for destinations
    gpu = {"ipc_device_uuid": str(torch.cuda.get_device_properties(device).uuid),
           "process_id": process_id()} if written else {}
    header = pb.PrepareHeader(backend=BACKEND, activation="swiglu", input_scale_policy="max", **header_options(),
                              tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                                   tensors=[header_for(n, t) for n, t in tensors.items()]),
                              delivery=pb.DELIVERY_CUDA_IPC, node_id=node_id(), **gpu)
    held = HeldRequests(iter([pb.PrepareRequest(header=header),
                              *(pb.PrepareRequest(chunk=c) for c in encode_tensors(tensors, 1 << 20))]))
    call = prep_pb2_grpc.PrepStub(grpc.insecure_channel(address)).Prepare(held, timeout=120)
    prepared = next(call).header
    if written:
        asked = next(call).ipc_write
        if mode == "wait-write":
            print("asked", flush=True)
        else:
            held.send_last(_overrunning(asked, prepared, device))
        _end(call)
        return
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
    _end(call)


def _overrunning(asked: pb.IpcWrite, prepared: pb.PreparedHeader, device: str) -> pb.PrepareRequest:
    """Destinations of tensors this process allocated, the first claiming a storage 2 GiB larger and its tensor
    1 GiB into it: past the end of anything this process allocated."""
    shared = []
    for spec in read_headers(prepared.tensors, "header.tensors"):
        tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=device)
        _, handle, size, offset, counter, counter_offset, _, _ = tensor.untyped_storage()._share_cuda_()
        torch.UntypedStorage._release_ipc_counter_cuda(counter, counter_offset)
        shared.append(pb.CudaIpcTensor(storage_handle=handle, storage_size_bytes=size, storage_offset_bytes=offset,
                                       tensor_offset=0, stride=list(tensor.stride())))
        _KEPT.append(tensor)  # alive and idle until the call ends, as the SDK keeps a landing
    shared[0].storage_size_bytes += 2 << 30
    shared[0].tensor_offset = (1 << 30) // _KEPT[0].element_size()
    return pb.PrepareRequest(destinations=pb.IpcDestinations(lease_id=asked.lease_id, tensors=shared))


_KEPT: list[torch.Tensor] = []


if __name__ == "__main__":
    address, mode, device, out = sys.argv[1:5]
    if mode in ("take", "take-bulk", "take-out", "again"):
        take(address, device, out, bulk_streams=2 if mode == "take-bulk" else 0, into=mode in ("take-out", "again"),
             again=mode == "again")
    else:
        raw(address, mode, device)
