"""PrepClient: prepares layers on nvfp4-prep servers, speaking only the nvfp4_prep.v1 contract."""

from __future__ import annotations

import itertools
import logging
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import grpc
import torch

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import (
    DEFAULT_CHUNK_SIZE, ChecksumError, FramingError, HostTensors, Prefetch, TensorReceiver, check_chunk_size,
    check_scalars, chunk_of, decode_response, encode_chunk, encode_message, header_for, iter_pieces,
    layout_from_proto, read_headers,
)

from .errors import (
    PrepChecksumError, PrepDeadlineExceeded, PrepLayoutMismatch, PrepProtocolError,
    PrepUnavailable, from_rpc_error,
)
from .result import RemoteLayer
from .targets import open_channel, target_uri

log = logging.getLogger(__name__)

_PER_EXPERT_KEY = re.compile(r"^\d+\.")
# Metadata key of the id that names one layer's request (and its retries) in both sides' logs.
REQUEST_ID_KEY = "x-request-id"


class Progress(NamedTuple):
    """Bytes done of one layer's upload ("upload") or download ("download")."""

    phase: str
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]


def tensor_form(tensors: Mapping[str, torch.Tensor]) -> int:
    """Per-expert when every key starts with an expert index ("0.gate_proj.weight"), else stacked."""
    if tensors and all(_PER_EXPERT_KEY.match(name) for name in tensors):
        return pb.TENSOR_FORM_PER_EXPERT
    return pb.TENSOR_FORM_STACKED


class _Stub:
    """The generated stub's methods, except that Prepare's chunks go through ``chunk_codec``."""

    def __init__(self, channel: grpc.Channel) -> None:
        generated = prep_pb2_grpc.PrepStub(channel)
        self.GetCapabilities = generated.GetCapabilities
        self.Prepare = channel.stream_stream(
            "/nvfp4_prep.v1.Prep/Prepare", request_serializer=encode_message, response_deserializer=decode_response)


class PrepClient:
    """A client of one or more nvfp4-prep servers.

    ``targets``: ``"host:port"``, a gRPC URI (``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``,
    ``"dns:///nvfp4-prep:50051"``) or a list of ``"ip:port"``; calls are spread
    over every address with round_robin. ``channels`` > 1 opens that many
    separate connections and rotates calls over them, for more throughput than
    one TCP stream gives. Calls that get UNAVAILABLE are retried ``retries``
    times with exponential backoff; ``timeout`` (seconds) bounds each call,
    retries included. ``credentials`` makes the channels secure (TLS);
    ``interceptors`` are gRPC client interceptors (auth, tracing). Use it as
    a context manager, or call ``close()``.
    """

    def __init__(self, targets: str | Sequence[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 timeout: float | None = None, retries: int = 4, backoff: float = 0.2, max_backoff: float = 5.0,
                 channels: int = 1, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] = (), interceptors: Sequence[object] = ()) -> None:
        try:
            self.chunk_size = check_chunk_size(chunk_size)
        except FramingError as err:
            raise ValueError(str(err)) from None
        if channels < 1 or retries < 0:
            raise ValueError("channels must be >= 1 and retries >= 0")
        self.target = target_uri(targets)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._channels = [open_channel(self.target, credentials, channels > 1, options) for _ in range(channels)]
        self._stubs = [_Stub(grpc.intercept_channel(channel, *interceptors)) for channel in self._channels]
        self._next_stub = itertools.cycle(self._stubs)
        self._lock = threading.Lock()

    def __enter__(self) -> "PrepClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _stub(self) -> "_Stub":
        with self._lock:
            return next(self._next_stub)

    # -- calls -----------------------------------------------------------------------------------

    def capabilities(self, timeout: float | None = None) -> pb.Capabilities:
        """What the server (one of them, under round_robin) runs and offers."""
        return self._with_retries(lambda remaining: self._stub().GetCapabilities(
            pb.GetCapabilitiesRequest(), timeout=remaining), timeout)

    def prepare_layer(self, tensors: Mapping[str, torch.Tensor], backend: str, activation: str = "swiglu",
                      input_scale_policy: str = "max", *, layout_version: str | None = None,
                      timeout: float | None = None, progress: ProgressCallback | None = None) -> RemoteLayer:
        """Prepares one layer remotely; same tensors in and out as ``nvfp4_prep.pipeline.prepare``.

        ``tensors`` is the stacked form (``w13_weight``, ...) or the per-expert
        form (``"0.gate_proj.weight"``, ...). ``layout_version`` pins the layout
        id the answer must carry. ``progress`` is called with Progress tuples,
        from gRPC's threads as well as the caller's; if it raises, the call is
        cancelled and its exception raised here.
        """
        cpu = {name: tensor.detach().to("cpu") for name, tensor in tensors.items()}
        header = pb.PrepareHeader(
            backend=backend, activation=activation, input_scale_policy=input_scale_policy,
            layout_version=layout_version or "",
            tensors=pb.TensorSet(form=tensor_form(cpu), tensors=[header_for(name, t) for name, t in cpu.items()]),
        )
        total = sum(t.numel() * t.element_size() for t in cpu.values())

        def chunks(callback_errors: list[BaseException]) -> Iterator[bytes]:
            done = 0
            for index, offset, data in iter_pieces(list(cpu.values()), self.chunk_size):
                yield encode_chunk(index, offset, data)
                done += len(data)
                if progress is not None:
                    try:
                        progress(Progress("upload", done, total))
                    except BaseException as err:  # stop uploading; the caller gets this error
                        callback_errors.append(err)
                        return

        def requests(callback_errors: list[BaseException]) -> Prefetch:
            return Prefetch(itertools.chain([pb.PrepareRequest(header=header)], chunks(callback_errors)))

        return self._prepare(requests, header, timeout, progress)

    def prepare_reference(self, location: str, layer_prefix: str, backend: str, activation: str = "swiglu",
                          input_scale_policy: str = "max", *, layout_version: str | None = None,
                          timeout: float | None = None, progress: ProgressCallback | None = None) -> RemoteLayer:
        """Prepares a layer that the server reads from a checkpoint under its allowed roots."""
        header = pb.PrepareHeader(
            backend=backend, activation=activation, input_scale_policy=input_scale_policy,
            layout_version=layout_version or "",
            ref=pb.CheckpointRef(location=location, layer_prefix=layer_prefix),
        )
        def requests(_: list[BaseException]) -> Iterator[pb.PrepareRequest]:
            return iter([pb.PrepareRequest(header=header)])

        return self._prepare(requests, header, timeout, progress)

    def prepare_layers(self, layers: Iterable[Mapping[str, torch.Tensor]], backend: str, activation: str = "swiglu",
                       input_scale_policy: str = "max", *, concurrency: int = 4, **kwargs) -> Iterator[RemoteLayer]:
        """Prepares many layers with up to ``concurrency`` calls in flight; yields results in input order."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        with ThreadPoolExecutor(concurrency, thread_name_prefix="nvfp4-prep-client") as pool:
            pending = []
            for layer in layers:
                pending.append(pool.submit(self.prepare_layer, layer, backend, activation, input_scale_policy,
                                           **kwargs))
                while len(pending) >= 2 * concurrency:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, requests: Callable[[list[BaseException]], Iterator[pb.PrepareRequest | bytes]],
                 header: pb.PrepareHeader, timeout: float | None, progress: ProgressCallback | None) -> RemoteLayer:
        request_id = uuid.uuid4().hex
        log.debug("request %s: %s %s", request_id, header.backend, header.WhichOneof("source"))

        def attempt(remaining: float | None) -> RemoteLayer:
            callback_errors: list[BaseException] = []
            upload = requests(callback_errors)
            call = self._stub().Prepare(upload, timeout=remaining, metadata=((REQUEST_ID_KEY, request_id),))
            try:
                return _receive(call, header, progress)
            except BaseException:
                call.cancel()
                if callback_errors:  # the upload stopped because the progress callback raised
                    raise callback_errors[0] from None
                raise
            finally:
                if isinstance(upload, Prefetch):
                    upload.close()  # stops the encoding thread even while gRPC waits on it

        try:
            layer = self._with_retries(attempt, timeout)
        except Exception as err:
            log.warning("request %s failed: %s", request_id, err)
            raise
        log.info("request %s: prepared for %s", request_id, layer.layout.get("layout_id"))
        return layer

    def _with_retries(self, attempt, timeout: float | None):
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        for tries in itertools.count():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise PrepDeadlineExceeded("deadline passed before the call could start",
                                           grpc.StatusCode.DEADLINE_EXCEEDED)
            try:
                return attempt(remaining)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            if not isinstance(error, PrepUnavailable) or tries >= self.retries:
                raise error
            pause = min(self.max_backoff, self.backoff * 2 ** tries) * random.uniform(0.5, 1.0)
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0))
            time.sleep(pause)


def _receive(call: Iterator[pb.PrepareResponse], asked: pb.PrepareHeader,
             progress: ProgressCallback | None) -> RemoteLayer:
    """Reads one Prepare answer, verifying every chunk, the layout record and the scalars."""
    first = next(call, None)
    if first is None or chunk_of(first) is not None:
        raise PrepProtocolError("response.header: did not come first (expected a PreparedHeader)")
    header = first.header
    try:
        specs = read_headers(header.tensors, "response.header.tensors")
        total = sum(spec.byte_length for spec in specs)
        sink = HostTensors(specs)
        receiver = TensorReceiver(specs, sink, "response.tensors")
        for response in call:
            chunk = chunk_of(response)
            if chunk is None:
                raise FramingError("response.header", "arrived again", "only chunks after the first header")
            receiver.add(chunk)
            if progress is not None:
                progress(Progress("download", receiver.bytes_received, total))
        receiver.finish()
        tensors = sink.tensors()
        check_scalars(header.scalars, tensors, "response.header.scalars")
    except ChecksumError as err:
        raise PrepChecksumError(str(err), field=err.field) from None
    except FramingError as err:
        raise PrepProtocolError(str(err), field=err.field) from None
    layout = layout_from_proto(header.layout)
    _check_layout(layout, asked)
    return RemoteLayer(tensors=tensors, layout=layout, scalars={
        field.name: list(getattr(header.scalars, field.name)) for field in pb.DerivedScalars.DESCRIPTOR.fields
    }, cache_hit=header.cache_hit)


def _check_layout(layout: dict, asked: pb.PrepareHeader) -> None:
    wanted = {"backend": asked.backend, "activation": asked.activation,
              "input_scale_policy": asked.input_scale_policy}
    if asked.layout_version:
        wanted["layout_id"] = asked.layout_version
    for key, value in wanted.items():
        if layout.get(key) != value:
            raise PrepLayoutMismatch(f"response.header.layout.{key}: is {layout.get(key)!r}, asked for {value!r}",
                                     field=f"layout.{key}")
