"""The client memory this server writes prepared layers into: CUDA IPC mappings of a same-node client's tensors.

Opening a client's allocation costs a few tenths of a millisecond and closing it as much, about a tenth of
copying a layer on an H200; an engine lands in the same tensors (its parameters, or the same landing buffer
reused by the caching allocator) call after call. So a mapping stays open while calls use it and for
``idle_seconds`` after (--ipc-lease-timeout), and at most ``MAX_MAPPINGS`` stay open; torch's own cache of
opened handles makes every later view of an open allocation free.

The client's memory is the client's: it keeps it alive and idle until the server says it wrote (the client
waits for that; one that gives a call up may let it go sooner, so a write starts only while its call is still
on), so no cross-process reference counter is taken. What the server must guard is itself: a
destination is written only after checking that it lies inside the allocation the CUDA driver reports for the
mapping, so a lying size cannot make a copy run past the client's memory and fault this server's context.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nvfp4_prep.v1 import prep_pb2 as pb

from .errors import invalid

log = logging.getLogger(__name__)

MAX_MAPPINGS = 256
MAX_HANDLE_BYTES = 256  # a cudaIpcMemHandle_t is 64 bytes; torch's expandable segments add a little
_NO_COUNTER = b""  # no reference counter: a storage mapped so decrements nothing when it goes
_NO_EVENT = bytes(64)


def allocation_extent(pointer: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation holding ``pointer`` in the current context, as the driver knows it."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    result = _driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
    if result != 0:
        raise RuntimeError(f"cuMemGetAddressRange failed with CUresult {result}")
    return base.value, size.value


_DRIVER: ctypes.CDLL | None = None


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = ctypes.CDLL("libcuda.so.1")
    return _DRIVER


@dataclass
class _Mapping:
    anchor: torch.Tensor | None  # the whole allocation, flat; keeps torch's mapping of it open (None: closed)
    size: int
    used: float


class ClientMemory:
    """Open mappings of client allocations by CUDA IPC handle, closed ``idle_seconds`` after their last use."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._mappings: OrderedDict[tuple[int, bytes], _Mapping] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._mappings)

    def destination(self, device: int, shared: pb.CudaIpcTensor, nbytes: int, itemsize: int, field: str
                    ) -> torch.Tensor:
        """A flat uint8 view of the ``nbytes`` the client named in ``shared`` on ``device`` (the current device),
        once they check out (INVALID_ARGUMENT naming ``field`` otherwise): a row-major tensor inside its storage,
        and the storage inside the allocation mapped."""
        handle = shared.storage_handle
        if not handle or len(handle) > MAX_HANDLE_BYTES:
            raise invalid(f"{field}.storage_handle", f"is {len(handle)} bytes",
                          f"a CUDA IPC memory handle of 1 to {MAX_HANDLE_BYTES} bytes (UntypedStorage._share_cuda_)")
        start = shared.tensor_offset * itemsize
        if start + nbytes > shared.storage_size_bytes:
            raise invalid(f"{field}.storage_size_bytes", f"is {shared.storage_size_bytes}",
                          f"at least {start + nbytes}: the tensor's bytes {start} to {start + nbytes}")
        whole = self._mapping(device, shared, field)
        first = shared.storage_offset_bytes + start  # in the allocation
        if first + nbytes > whole.numel():
            raise invalid(field, f"places the tensor's bytes from {first} to {first + nbytes} of the allocation "
                          "mapped", f"bytes inside the client's allocation, of {whole.numel()} bytes")
        return whole[first:first + nbytes]

    def _mapping(self, device: int, shared: pb.CudaIpcTensor, field: str) -> torch.Tensor:
        """The whole client allocation named by ``shared`` as a flat uint8 tensor (mapped now if it is not), of the
        size the driver reports for it (never what the client claims)."""
        key = (device, shared.storage_handle)
        with self._lock:
            mapping = self._mappings.get(key)
            if mapping is not None:
                mapping.used = time.monotonic()
                self._mappings.move_to_end(key)
                return mapping.anchor
        try:
            claimed = torch.UntypedStorage._new_shared_cuda(
                device, shared.storage_handle, shared.storage_size_bytes, shared.storage_offset_bytes, _NO_COUNTER,
                0, _NO_EVENT, False)
            base = claimed.data_ptr() - shared.storage_offset_bytes  # where torch mapped the allocation
            start, size = allocation_extent(base)
            if start != base:
                raise invalid(f"{field}.storage_handle", f"maps to {base:#x}, inside an allocation at {start:#x}",
                              "a CUDA IPC memory handle, which maps a whole allocation")
            whole = torch.UntypedStorage._new_shared_cuda(  # the same mapping, torch's cache says
                device, shared.storage_handle, size, 0, _NO_COUNTER, 0, _NO_EVENT, False)
        except RuntimeError as err:
            raise invalid(f"{field}.storage_handle", f"could not be opened on cuda:{device} "
                          f"({str(err).splitlines()[0]})", "a CUDA IPC memory handle of the client's tensor on "
                          "the GPU named by header.ipc_device_uuid") from None
        flat = torch.empty(0, dtype=torch.uint8, device=device).set_(whole, 0, (size,), (1,))
        return self._keep(key, _Mapping(flat, size, time.monotonic())).anchor

    def _keep(self, key: tuple[int, bytes], mapping: _Mapping) -> _Mapping:
        evicted = []
        with self._lock:
            if key in self._mappings:  # another call opened it meanwhile: same mapping, torch shares it
                return self._mappings[key]
            self._mappings[key] = mapping
            while len(self._mappings) > MAX_MAPPINGS:
                evicted.append(self._mappings.popitem(last=False))
            if self._sweeper is None and not self._closed:
                self._sweeper = threading.Thread(target=self._sweep, name="nvfp4-prep-ipc-sweep", daemon=True)
                self._sweeper.start()
            self._wake.notify()
        log.debug("cuda_ipc: mapped a client allocation of %d bytes on cuda:%d (%d open)", mapping.size, key[0],
                  len(self._mappings))
        for (device, _), old in evicted:
            self._close(device, old)
        return mapping

    def _sweep(self) -> None:
        """Closes mappings idle for ``idle_seconds``, until ``close``."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                idle = [key for key, mapping in self._mappings.items() if now - mapping.used >= self.idle_seconds]
                closing = [(key[0], self._mappings.pop(key)) for key in idle]
                if closing:
                    self._lock.release()
                    try:
                        for device, mapping in closing:
                            self._close(device, mapping)
                    finally:
                        self._lock.acquire()
                    continue
                oldest = min((mapping.used for mapping in self._mappings.values()), default=None)
                self._wake.wait(None if oldest is None else oldest + self.idle_seconds - now)

    def _close(self, device: int, mapping: _Mapping) -> None:
        try:
            with torch.cuda.device(device):
                mapping.anchor = None  # the last view of the allocation here closes torch's mapping of it
        except RuntimeError:  # e.g. a client that died first: the sweeper carries on with the others
            log.warning("cuda_ipc: closing a client allocation of %d bytes on cuda:%d failed", mapping.size, device,
                        exc_info=True)
            return
        log.debug("cuda_ipc: closed a client allocation of %d bytes on cuda:%d", mapping.size, device)

    def close(self) -> None:
        """Closes every mapping (the server stops)."""
        with self._lock:
            self._closed = True
            closing = list(self._mappings.items())
            self._mappings.clear()
            self._wake.notify()
        for (device, _), mapping in closing:
            self._close(device, mapping)
