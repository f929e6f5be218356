"""A raw Prepare call that a test holds open: the server sees a live stream whose chunks come only when told.

Admission, budget, deadline and greedy-client tests need calls that occupy a slot or a reservation for as
long as the test wants, without a client library retrying or finishing them.
"""

from __future__ import annotations

import threading
import time

import grpc

from nvfp4_prep.server.estimate import reservation_bytes
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import encode_tensors, header_for, read_headers

BACKEND = "flashinfer_cutlass"


def need_of(layer, backend: str = BACKEND) -> int:
    """The bytes the server reserves for ``layer`` (its admission estimate)."""
    return reservation_bytes(read_headers([header_for(n, t) for n, t in layer.items()], "t"), False, backend,
                             "swiglu")


class HeldCall:
    """Sends the header (unless ``header=False``) and ``chunks_first`` chunks, then the rest once released, or
    one chunk every ``pace`` seconds. ``result`` is the list of responses or the RpcError once ``finished``."""

    def __init__(self, target: grpc.Channel | prep_pb2_grpc.PrepStub, layer, *, header: bool = True,
                 chunks_first: int = 0, pace: float | None = None, chunk_size: int = 64 << 10,
                 backend: str = BACKEND, timeout: float = 120) -> None:
        stub = prep_pb2_grpc.PrepStub(target) if isinstance(target, grpc.Channel) else target
        self.release_event = threading.Event()
        first = pb.PrepareRequest(header=pb.PrepareHeader(
            backend=backend, activation="swiglu", input_scale_policy="max",
            tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED, tensors=[header_for(n, t) for n, t in layer.items()])))
        chunks = [pb.PrepareRequest(chunk=c) for c in encode_tensors(layer, chunk_size)]

        def requests():
            if not header:
                self.release_event.wait(timeout)
                return
            yield first
            yield from chunks[:chunks_first]
            for chunk in chunks[chunks_first:]:
                if pace is None:
                    self.release_event.wait(timeout)
                else:
                    time.sleep(pace)
                yield chunk

        self.call = stub.Prepare(requests(), timeout=timeout)
        self.result: object = None
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    @property
    def error(self) -> grpc.RpcError | None:
        return self.result if isinstance(self.result, grpc.RpcError) else None

    def _collect(self) -> None:
        try:
            self.result = list(self.call)
        except grpc.RpcError as err:
            self.result = err
        self.finished.set()

    def wait(self, timeout: float = 30) -> object:
        """The result once the call ended on its own (the server answered or failed it)."""
        self._thread.join(timeout)
        return self.result

    def release(self, timeout: float = 60) -> object:
        self.release_event.set()
        self._thread.join(timeout)
        return self.result

    def cancel(self) -> None:
        self.call.cancel()
        self.release_event.set()
        self._thread.join(60)
