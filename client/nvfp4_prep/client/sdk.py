"""PrepClient: prepares layers on nvfp4-prep servers, speaking only the nvfp4_prep.v1 contract."""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nvfp4_prep.contract.expert_keys import looks_per_expert
from nvfp4_prep.contract.layout import STACKED_NAMES, STACKED_SCALE_NAMES
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import (
    DEFAULT_CHUNK_SIZE,
    REQUEST_ID_KEY,
    FramingError,
    Prefetch,
    check_chunk_size,
    decode_response,
    encode_chunk,
    encode_message,
    header_for,
    iter_pieces,
)

from .bulk import BulkAttempt, BulkDialer, tls_context
from .credentials import BearerToken, PemSource, channel_credentials, is_loopback
from .errors import PrepClientError, PrepInvalidArgument
from .ipc import STREAM, HeldRequests, delivery_fields
from .landing import DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES, Placement, placement, resolve_device
from .receiver import Answer, Progress, ProgressCallback
from .result import RemoteLayer
from .retry import RetryPolicy
from .targets import open_channel, target_uri

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prep"].full_name


def tensor_form(tensors: Mapping[str, torch.Tensor]) -> int:
    """Per-expert when every key starts with an expert index ("0.gate_proj.weight"), else stacked."""
    if tensors and all(looks_per_expert(name) for name in tensors):
        return pb.TENSOR_FORM_PER_EXPERT
    return pb.TENSOR_FORM_STACKED


def upload_order(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The order tensors are announced and sent in: a stacked layer's per-expert scales first, then its weights in
    the order of the answer (``STACKED_NAMES``), then anything else as given. The server then has the scales its
    answer's header needs at once, and answers each weight while the later ones still arrive."""
    if tensor_form(tensors) != pb.TENSOR_FORM_STACKED:
        return dict(tensors)
    known = [name for name in (*STACKED_SCALE_NAMES, *STACKED_NAMES) if name in tensors]
    order = dict.fromkeys((*known, *tensors))
    return {name: tensors[name] for name in order}


def _with_activation_scales(tensors: Mapping[str, torch.Tensor], quantize: str | None,
                            scales: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """The tensors a quantizing request streams: the weights and their activation scales, under distinct names."""
    if not scales:
        return tensors
    if not quantize:
        raise PrepInvalidArgument("activation_scales: given without quantize; expected a recipe in quantize "
                                  "(NVFP4 tensors carry their input scales themselves)", field="activation_scales")
    both = sorted(set(tensors) & set(scales))
    if both:
        raise PrepInvalidArgument(f"activation_scales: {both[0]!r} is also in tensors; expected weights in tensors "
                                  "and input scales in activation_scales", field="activation_scales")
    return {**tensors, **scales}


class _Stub:
    """The generated stub's methods, except that Prepare's chunks go through ``chunk_codec``."""

    def __init__(self, channel: grpc.Channel) -> None:
        generated = prep_pb2_grpc.PrepStub(channel)
        self.GetCapabilities = generated.GetCapabilities
        self.Prepare = channel.stream_stream(
            "/nvfp4_prep.v1.Prep/Prepare", request_serializer=encode_message, response_deserializer=decode_response)


def header_options(*, profile: str = "seed", gated_group_size: int = 64, tp_rank: int = 0, tp_size: int = 1,
                   ep_rank: int = 0, ep_size: int = 1, expert_placement: str = "linear",
                   inputs_are_shard: bool = False) -> dict:
    """The ``PrepareHeader`` fields of ``pipeline.prepare``'s profile and shard keywords; the server checks them.

    ``inputs_are_shard``: the streamed tensors are the rank's input shard (``pipeline.cut_shard``, with every
    expert's input scales), not the whole layer (SPEC section 11)."""
    return {"profile": profile, "gated_group_size": gated_group_size,
            "shard": pb.RankShard(tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size,
                                  expert_placement=expert_placement, inputs_are_shard=inputs_are_shard)}


class PrepClient:
    """A client of one or more nvfp4-prep servers.

    ``targets``: ``"host:port"``, a gRPC URI (``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``,
    ``"dns:///nvfp4-prep:50051"``) or a list of ``"ip:port"``; calls are spread
    over every address with round_robin. ``channels`` > 1 opens that many
    separate connections and rotates calls over them, for more throughput than
    one TCP stream gives. ``timeout`` (seconds) bounds each call, retries
    included.

    Security: ``tls_ca`` (the CA of the server's certificate; default the
    system's roots) makes the channels TLS, ``tls_cert`` and ``tls_key`` add
    this client's certificate for mutual TLS (paths or PEM bytes);
    ``credentials`` is the same as ready-made gRPC channel credentials.
    ``token`` is sent as ``authorization: Bearer <token>`` with every call.
    ``interceptors`` are further gRPC client interceptors (tracing).

    Retries: a failed call is sent again, with exponential backoff and jitter,
    for up to ``retry_timeout`` seconds after it first failed (long enough for
    a server to restart; counted again once a resumed attempt got further),
    only when it failed for a passing reason: UNAVAILABLE (no connection, a
    broken stream, a draining server) or a refusal because too many calls were
    running (RESOURCE_EXHAUSTED naming max_concurrent or
    max_concurrent_per_client). ``retries`` caps the number of retries as well
    (None: no cap); ``timeout`` still bounds the whole call. A connection that
    TLS refused (PrepHandshakeFailed, with a hint at the likely cause) is tried
    twice at most. Sending again is safe because every call is idempotent:
    GetCapabilities only reads, and Prepare is a pure function of its source
    tensors and parameters; the server keeps nothing from it but a cache of the
    same answer. A stream that broke part-way resumes after the last verified
    chunk. Everything else (INVALID_ARGUMENT, DATA_LOSS, a size limit,
    UNAUTHENTICATED, DEADLINE_EXCEEDED, ...) would fail the same way again, and
    is raised at once. Each retry is logged at INFO (logger ``nvfp4_prep.client``).
    Use it as a context manager, or call ``close()``.

    Landing: ``device="cuda:N"`` on a call allocates each tensor on that device and moves the verified
    chunks through ``staging_bytes`` of pinned host buffers (four of a quarter each) with asynchronous
    copies overlapped with receiving, so peak host memory is that ring, not the layer; ``out=`` writes into
    tensors the caller allocated, after checking their names, shapes and dtypes at the answer's header.

    Bulk: ``bulk_streams`` N (1 to 8; 0, the default: inline) asks every Prepare call for the server's bulk
    transport: the tensor chunks travel over N TCP connections beside the gRPC stream (TLS with the same
    ``tls_ca``/``tls_cert``/``tls_key``), checked and landed exactly as inline chunks. A server without it,
    or one whose bulk port cannot be reached within a few seconds, gets the call inline (logged once at INFO), and
    so does a call with ``delivery="cuda_ipc"``, whose request stream stays open for ``PrepareRequest.taken`` or
    ``.destinations``.
    """

    def __init__(self, targets: str | Sequence[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 timeout: float | None = None, retry_timeout: float = 60.0, retries: int | None = None,
                 backoff: float = 0.2, max_backoff: float = 5.0,
                 channels: int = 1, credentials: grpc.ChannelCredentials | None = None,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                 tls_key: PemSource | None = None, token: str | None = None,
                 options: Sequence[tuple[str, object]] = (), interceptors: Sequence[object] = (),
                 staging_bytes: int = DEFAULT_STAGING_BYTES, bulk_streams: int = 0) -> None:
        try:
            self.chunk_size = check_chunk_size(chunk_size)
        except FramingError as err:
            raise ValueError(str(err)) from None
        if channels < 1:
            raise ValueError(f"channels: expected an integer >= 1, got {channels!r}")
        if not isinstance(staging_bytes, int) or staging_bytes < MIN_STAGING_BYTES:
            raise ValueError(f"staging_bytes: expected an integer >= {MIN_STAGING_BYTES}, got {staging_bytes!r}")
        self.staging_bytes = staging_bytes
        self.retry = RetryPolicy(retry_timeout, retries, backoff, max_backoff)
        self.target = target_uri(targets)
        tls = channel_credentials(tls_ca, tls_cert, tls_key)
        if tls is not None and credentials is not None:
            raise ValueError("credentials and tls_ca/tls_cert/tls_key: give one or the other")
        self._bulk = self._bulk_dialer(bulk_streams, credentials, tls_ca, tls_cert, tls_key, options)
        credentials = credentials or tls
        self._tls = credentials is not None
        if token is not None:
            if credentials is None and not is_loopback(self.target):
                log.warning("sending a bearer token over plaintext to %s; give tls_ca to encrypt it", self.target)
            interceptors = (BearerToken(token), *interceptors)
        self.timeout = timeout
        self._channels = [open_channel(self.target, credentials, channels > 1, options) for _ in range(channels)]
        intercepted = [grpc.intercept_channel(channel, *interceptors) for channel in self._channels]
        self._health_channel = intercepted[0]
        self._stubs = [_Stub(channel) for channel in intercepted]
        self._next_stub = itertools.cycle(self._stubs)
        self._lock = threading.Lock()

    def _bulk_dialer(self, streams: int, credentials: grpc.ChannelCredentials | None, tls_ca: PemSource | None,
                     tls_cert: PemSource | None, tls_key: PemSource | None,
                     options: Sequence[tuple[str, object]]) -> BulkDialer | None:
        """How calls open their bulk connections (None: ``streams`` 0, every call inline), TLS like the channel."""
        if streams == 0:
            return None
        unusable = ""
        if credentials is not None:
            unusable = "the channel's TLS came as grpc credentials; give tls_ca, tls_cert and tls_key to use bulk"
        tls = tls_context(tls_ca, tls_cert, tls_key) if (tls_ca, tls_cert, tls_key) != (None, None, None) else None
        server_name = dict(options).get("grpc.ssl_target_name_override")
        return BulkDialer(streams, self.target, tls, str(server_name) if server_name else None, unusable)

    def __enter__(self) -> PrepClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _stub(self) -> _Stub:
        with self._lock:
            return next(self._next_stub)

    # -- calls -----------------------------------------------------------------------------------

    def capabilities(self, timeout: float | None = None) -> pb.Capabilities:
        """What the server (one of them, under round_robin) runs and offers."""
        return self._with_retries(lambda remaining: self._stub().GetCapabilities(
            pb.GetCapabilitiesRequest(), timeout=remaining), timeout, "GetCapabilities")

    def health(self, service: str = SERVICE_NAME, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of ``service`` on the server, e.g. "SERVING" or "NOT_SERVING"."""
        stub = health_pb2_grpc.HealthStub(self._health_channel)
        answer = self._with_retries(lambda remaining: stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=remaining), timeout, "health check")
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def prepare_layer(self, tensors: Mapping[str, torch.Tensor], backend: str, activation: str = "swiglu",
                      input_scale_policy: str = "max", *, layout_version: str | None = None,
                      timeout: float | None = None, progress: ProgressCallback | None = None,
                      device: str | torch.device | None = None, out: Mapping[str, torch.Tensor] | None = None,
                      quantize: str | None = None, activation_scales: Mapping[str, torch.Tensor] | None = None,
                      delivery: str = STREAM,
                      **layout_options: object) -> RemoteLayer:
        """Prepares one layer remotely; same tensors in and out as ``nvfp4_prep.pipeline.prepare``.

        ``tensors`` is the stacked form (``w13_weight``, ...) or the per-expert
        form (``"0.gate_proj.weight"``, ...). ``layout_version`` pins the layout
        id the answer must carry. ``layout_options`` are those of
        ``pipeline.prepare``: ``profile``, ``gated_group_size``, and the rank's
        ``tp_rank``, ``tp_size``, ``ep_rank``, ``ep_size``, ``expert_placement``
        (send the whole layer; the answer is the rank's shard). ``progress`` is
        called with Progress tuples, from gRPC's threads as well as the
        caller's; if it raises, the call is cancelled and its exception raised here.

        ``device``: None or "cpu" (pageable CPU tensors), or "cuda"/"cuda:N"/a torch.device, where the
        answer lands through pinned staging. ``out``: a mapping of name to pre-allocated, contiguous
        tensor (CPU or CUDA) that the answer is written into in place; every announced tensor needs one
        of the same name, shape and dtype, and no other may be given (PrepOutputMismatch, nothing
        written); the result's ``tensors`` are then those objects.

        ``quantize``: ``"modelopt"`` or ``"llm-compressor"`` (``capabilities().quantize_recipes``): ``tensors``
        are then bfloat16, float16 or float32 weights (stacked ``w13_weight [E, N1, H]`` and ``w2_weight
        [E, H, I]``, or per-expert ``"0.gate_proj.weight"``, ...), which the server quantizes by that tool's
        rules and prepares in the same pass: the answer equals preparing the tool's checkpoint. Every backend
        is W4A4, so ``activation_scales`` are needed: stacked ``w13_input_scale`` ``[E, 2]`` and
        ``w2_input_scale`` ``[E]`` (ModelOpt's form), or per-expert ``"0.gate_proj.input_scale"`` (ModelOpt) or
        ``"0.gate_proj.input_global_scale"`` (compressed-tensors), float32 (``load_activation_scales`` and
        ``layer_scales`` of ``nvfp4_prep.prepared.activation_scales`` read them from an NVFP4 checkpoint of the
        same model or a calibration file). They travel with the weights. A weight sync lands the answer in the
        engine's own tensors with ``out=``.

        ``delivery="cuda_ipc"`` (beside the server, on its node: a sidecar): no tensor byte crosses a socket.
        When the layer was prepared on the GPU the answer lands on (``device``, a CUDA device, required; or
        ``out`` on one GPU), the server writes it straight into this process's tensors there, in one device copy
        (it keeps them mapped for --ipc-lease-timeout, so landing in the same ``out`` tensors again costs no
        mapping; the work queued on their device's current stream is waited for first; on an error their
        contents are undefined, and a ``device`` landing the server was told to write into is kept for
        ``ipc.WRITE_GRACE`` seconds before its memory goes back, as the write may still be landing). Otherwise
        it hands its GPU's prepared tensors over as CUDA IPC handles, copied device to device (a peer copy from
        another GPU). When it can do neither
        (another node, a CPU server, a cached answer), the answer streams as usual. The result's tensors are
        this process's own either way. Needs CUDA here, else PrepInvalidArgument naming ``delivery``.
        """
        where = placement(device, out, self.staging_bytes)
        sent = _with_activation_scales(tensors, quantize, activation_scales)
        cpu = {name: tensor.detach().to("cpu") for name, tensor in upload_order(sent).items()}
        header = pb.PrepareHeader(
            backend=backend, activation=activation, input_scale_policy=input_scale_policy,
            layout_version=layout_version or "", quantize=quantize or "", **header_options(**layout_options),
            **delivery_fields(delivery, where),
            tensors=pb.TensorSet(form=tensor_form(cpu), tensors=[header_for(name, t) for name, t in cpu.items()]),
        )
        total = sum(t.numel() * t.element_size() for t in cpu.values())

        def chunks(callback_errors: list[BaseException]) -> Iterator[tuple[int, int, memoryview]]:
            """The upload's pieces, views of ``cpu`` (alive for the whole call): encoded inline, or by the bulk
            streams' threads."""
            done = 0
            for piece in iter_pieces(list(cpu.values()), self.chunk_size):
                yield piece
                done += len(piece[2])
                if progress is not None:
                    try:
                        progress(Progress("upload", done, total))
                    except BaseException as err:  # stop uploading; the caller gets this error
                        callback_errors.append(err)
                        return

        def requests(asked: pb.PrepareHeader, callback_errors: list[BaseException],
                     bulk: BulkAttempt | None = None) -> Prefetch:
            first = pb.PrepareRequest(header=asked)
            if bulk is not None:  # the chunks go inline, or over the bulk connections
                return Prefetch(bulk.requests(first, chunks(callback_errors)))
            encoded = (encode_chunk(*piece) for piece in chunks(callback_errors))
            return Prefetch(itertools.chain([first], encoded))

        return self._prepare(requests, header, timeout, progress, where)

    def prepare_reference(self, location: str, layer_prefix: str, backend: str, activation: str = "swiglu",
                          input_scale_policy: str = "max", *, layout_version: str | None = None,
                          timeout: float | None = None, progress: ProgressCallback | None = None,
                          device: str | torch.device | None = None, out: Mapping[str, torch.Tensor] | None = None,
                          quantize: str | None = None, activation_scales_location: str | None = None,
                          delivery: str = STREAM,
                          **layout_options: object) -> RemoteLayer:
        """Prepares a layer that the server reads from a checkpoint under its allowed roots; ``device``,
        ``out`` and ``layout_options`` as for ``prepare_layer``.

        A BF16 (FP16, FP32) checkpoint needs ``quantize`` (a recipe, as for ``prepare_layer``) and
        ``activation_scales_location``: an NVFP4 checkpoint of the same model or a calibration ``.safetensors``
        file of per-module input scales, as the server sees it (under its allowed roots too). ``delivery`` as for
        ``prepare_layer``: with the server's GPU on this node, only the handles cross the socket."""
        where = placement(device, out, self.staging_bytes)
        header = pb.PrepareHeader(
            backend=backend, activation=activation, input_scale_policy=input_scale_policy,
            layout_version=layout_version or "", quantize=quantize or "", **header_options(**layout_options),
            **delivery_fields(delivery, where),
            ref=pb.CheckpointRef(location=location, layer_prefix=layer_prefix,
                                 activation_scales_location=activation_scales_location or ""),
        )
        def requests(asked: pb.PrepareHeader, _: list[BaseException],
                     bulk: BulkAttempt | None = None) -> Iterator[pb.PrepareRequest]:
            first = pb.PrepareRequest(header=asked)  # the server reads the layer: nothing to send again
            return iter([first]) if bulk is None else bulk.requests(first, iter(()))

        return self._prepare(requests, header, timeout, progress, where)

    def prepare_layers(self, layers: Iterable[Mapping[str, torch.Tensor]], backend: str, activation: str = "swiglu",
                       input_scale_policy: str = "max", *, concurrency: int = 4,
                       device: str | torch.device | None = None, **kwargs) -> Iterator[RemoteLayer]:
        """Prepares many layers with up to ``concurrency`` calls in flight; yields results in input order.

        ``device`` as for ``prepare_layer`` (each call has its own staging ring); ``out`` is not taken here.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if "out" in kwargs:
            raise PrepInvalidArgument("out: prepare_layers lands many layers, and one out mapping holds one; "
                                      "call prepare_layer(..., out=...) for each layer", field="out")
        kwargs["device"] = resolve_device(device)  # once, before any call; "cuda" pinned to this thread's device
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

    def _prepare(self, requests: Callable[[pb.PrepareHeader, list[BaseException], BulkAttempt | None],
                                          Iterator[pb.PrepareRequest | bytes]],
                 header: pb.PrepareHeader, timeout: float | None, progress: ProgressCallback | None,
                 where: Placement) -> RemoteLayer:
        request_id = uuid.uuid4().hex
        log.debug("request %s: %s %s", request_id, header.backend, header.WhichOneof("source"))
        if self._bulk is not None and header.delivery != pb.DELIVERY_CUDA_IPC:  # IPC keeps its request stream open
            bulk_request = self._bulk.request()
            if bulk_request is not None:
                header.bulk.CopyFrom(bulk_request)
        answer = Answer(header, progress, where)  # outlives a broken attempt, so the next one resumes

        def attempt(remaining: float | None) -> RemoteLayer:
            callback_errors: list[BaseException] = []
            asked = answer.request_header()
            if asked.HasField("resume_from"):
                log.info("request %s: resuming at tensor %d, byte %d", request_id, asked.resume_from.tensor_index,
                         asked.resume_from.offset)
            bulk = BulkAttempt(self._bulk) if asked.HasField("bulk") else None
            upload = requests(asked, callback_errors, bulk)
            held = HeldRequests(upload) if asked.delivery == pb.DELIVERY_CUDA_IPC else None  # open until taken
            call = self._stub().Prepare(upload if held is None else held, timeout=remaining,
                                        metadata=((REQUEST_ID_KEY, request_id),))
            try:
                return answer.receive(call, held, bulk)
            except BaseException:
                call.cancel()
                if callback_errors:  # the upload stopped because the progress callback raised
                    raise callback_errors[0] from None
                raise
            finally:
                if held is not None:
                    held.close()  # the request stream ends with the call, however it ended
                if isinstance(upload, Prefetch):
                    upload.close()  # stops the encoding thread even while gRPC waits on it
                if bulk is not None:
                    bulk.close()  # its connections, and a request stream still waiting for the offer

        try:
            layer = self._with_retries(attempt, timeout, f"request {request_id}", lambda: answer.resume_point)
        except Exception as err:
            answer.discard()  # no device copy of a given-up call lands after it raised
            if isinstance(err, PrepClientError):
                err.request_id = request_id
            log.debug("request %s failed: %s", request_id, err)  # raised: the caller reports it, once
            raise
        layer.request_id = request_id
        log.info("request %s: prepared for %s", request_id, layer.layout.get("layout_id"))
        return layer

    def _with_retries(self, attempt: Callable[[float | None], T], timeout: float | None, what: str,
                      position: Callable[[], object] = lambda: None) -> T:
        return self.retry.run(attempt, self.timeout if timeout is None else timeout, what, tls=self._tls,
                              position=position)
