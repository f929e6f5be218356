from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_FORM_UNSPECIFIED: _ClassVar[TensorForm]
    TENSOR_FORM_STACKED: _ClassVar[TensorForm]
    TENSOR_FORM_PER_EXPERT: _ClassVar[TensorForm]

class Delivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STREAM: _ClassVar[Delivery]
    DELIVERY_CUDA_IPC: _ClassVar[Delivery]
TENSOR_FORM_UNSPECIFIED: TensorForm
TENSOR_FORM_STACKED: TensorForm
TENSOR_FORM_PER_EXPERT: TensorForm
DELIVERY_STREAM: Delivery
DELIVERY_CUDA_IPC: Delivery

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "byte_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data", "crc32c")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class TensorSet(_message.Message):
    __slots__ = ("form", "tensors")
    FORM_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    form: TensorForm
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, form: _Optional[_Union[TensorForm, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class CheckpointRef(_message.Message):
    __slots__ = ("location", "layer_prefix", "activation_scales_location")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    LAYER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_SCALES_LOCATION_FIELD_NUMBER: _ClassVar[int]
    location: str
    layer_prefix: str
    activation_scales_location: str
    def __init__(self, location: _Optional[str] = ..., layer_prefix: _Optional[str] = ..., activation_scales_location: _Optional[str] = ...) -> None: ...

class PrepareHeader(_message.Message):
    __slots__ = ("backend", "activation", "input_scale_policy", "layout_version", "tensors", "ref", "resume_from", "profile", "gated_group_size", "shard", "quantize", "delivery", "node_id", "ipc_device_uuid", "process_id", "ipc_destinations", "bulk")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_POLICY_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    GATED_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    backend: str
    activation: str
    input_scale_policy: str
    layout_version: str
    tensors: TensorSet
    ref: CheckpointRef
    resume_from: ResumePoint
    profile: str
    gated_group_size: int
    shard: RankShard
    quantize: str
    delivery: Delivery
    node_id: str
    ipc_device_uuid: str
    process_id: str
    ipc_destinations: _containers.RepeatedCompositeFieldContainer[IpcDestination]
    bulk: BulkRequest
    def __init__(self, backend: _Optional[str] = ..., activation: _Optional[str] = ..., input_scale_policy: _Optional[str] = ..., layout_version: _Optional[str] = ..., tensors: _Optional[_Union[TensorSet, _Mapping]] = ..., ref: _Optional[_Union[CheckpointRef, _Mapping]] = ..., resume_from: _Optional[_Union[ResumePoint, _Mapping]] = ..., profile: _Optional[str] = ..., gated_group_size: _Optional[int] = ..., shard: _Optional[_Union[RankShard, _Mapping]] = ..., quantize: _Optional[str] = ..., delivery: _Optional[_Union[Delivery, str]] = ..., node_id: _Optional[str] = ..., ipc_device_uuid: _Optional[str] = ..., process_id: _Optional[str] = ..., ipc_destinations: _Optional[_Iterable[_Union[IpcDestination, _Mapping]]] = ..., bulk: _Optional[_Union[BulkRequest, _Mapping]] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: int
    def __init__(self, streams: _Optional[int] = ...) -> None: ...

class BulkOffer(_message.Message):
    __slots__ = ("ticket", "port", "streams", "host")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    streams: int
    host: str
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., streams: _Optional[int] = ..., host: _Optional[str] = ...) -> None: ...

class RankShard(_message.Message):
    __slots__ = ("tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement", "inputs_are_shard")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EP_RANK_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_ARE_SHARD_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int
    expert_placement: str
    inputs_are_shard: bool
    def __init__(self, tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., ep_rank: _Optional[int] = ..., ep_size: _Optional[int] = ..., expert_placement: _Optional[str] = ..., inputs_are_shard: _Optional[bool] = ...) -> None: ...

class CudaIpcTensor(_message.Message):
    __slots__ = ("storage_handle", "storage_size_bytes", "storage_offset_bytes", "tensor_offset", "stride", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    STORAGE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    tensor_offset: int
    stride: _containers.RepeatedScalarFieldContainer[int]
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, storage_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., tensor_offset: _Optional[int] = ..., stride: _Optional[_Iterable[int]] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class IpcLayer(_message.Message):
    __slots__ = ("lease_id", "device_index", "device_uuid", "lease_seconds", "tensors")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    device_index: int
    device_uuid: str
    lease_seconds: float
    tensors: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    def __init__(self, lease_id: _Optional[str] = ..., device_index: _Optional[int] = ..., device_uuid: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ...) -> None: ...

class IpcTaken(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class IpcWrite(_message.Message):
    __slots__ = ("lease_id", "lease_seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_seconds: float
    def __init__(self, lease_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class IpcDestinations(_message.Message):
    __slots__ = ("lease_id", "tensors")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    def __init__(self, lease_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ...) -> None: ...

class IpcDestination(_message.Message):
    __slots__ = ("tensor", "memory")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorHeader
    memory: CudaIpcTensor
    def __init__(self, tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., memory: _Optional[_Union[CudaIpcTensor, _Mapping]] = ...) -> None: ...

class IpcWritten(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ResumePoint(_message.Message):
    __slots__ = ("tensor_index", "offset")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("header", "chunk", "taken", "destinations")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    header: PrepareHeader
    chunk: TensorChunk
    taken: IpcTaken
    destinations: IpcDestinations
    def __init__(self, header: _Optional[_Union[PrepareHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., taken: _Optional[_Union[IpcTaken, _Mapping]] = ..., destinations: _Optional[_Union[IpcDestinations, _Mapping]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("layout_id", "backend", "activation", "input_scale_policy", "pipeline_version", "flashinfer_layout_version", "epilogue_tile_m", "sf_vec_size", "num_experts", "hidden_dim", "hidden_dim_unpadded", "intermediate_dim", "intermediate_dim_unpadded", "profile", "flashinfer_release", "gated_group_size", "padding_fill_byte", "hidden_alignment", "intermediate_alignment", "tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement", "global_num_experts", "expert_ids", "engine_config", "quantize_recipe", "quantized_from")
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLASHINFER_LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPILOGUE_TILE_M_FIELD_NUMBER: _ClassVar[int]
    SF_VEC_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_UNPADDED_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_DIM_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_DIM_UNPADDED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    FLASHINFER_RELEASE_FIELD_NUMBER: _ClassVar[int]
    GATED_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FILL_BYTE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EP_RANK_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_RECIPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FROM_FIELD_NUMBER: _ClassVar[int]
    layout_id: str
    backend: str
    activation: str
    input_scale_policy: str
    pipeline_version: str
    flashinfer_layout_version: str
    epilogue_tile_m: int
    sf_vec_size: int
    num_experts: int
    hidden_dim: int
    hidden_dim_unpadded: int
    intermediate_dim: int
    intermediate_dim_unpadded: int
    profile: str
    flashinfer_release: str
    gated_group_size: int
    padding_fill_byte: int
    hidden_alignment: int
    intermediate_alignment: int
    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int
    expert_placement: str
    global_num_experts: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    engine_config: EngineConfig
    quantize_recipe: str
    quantized_from: str
    def __init__(self, layout_id: _Optional[str] = ..., backend: _Optional[str] = ..., activation: _Optional[str] = ..., input_scale_policy: _Optional[str] = ..., pipeline_version: _Optional[str] = ..., flashinfer_layout_version: _Optional[str] = ..., epilogue_tile_m: _Optional[int] = ..., sf_vec_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., hidden_dim: _Optional[int] = ..., hidden_dim_unpadded: _Optional[int] = ..., intermediate_dim: _Optional[int] = ..., intermediate_dim_unpadded: _Optional[int] = ..., profile: _Optional[str] = ..., flashinfer_release: _Optional[str] = ..., gated_group_size: _Optional[int] = ..., padding_fill_byte: _Optional[int] = ..., hidden_alignment: _Optional[int] = ..., intermediate_alignment: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., ep_rank: _Optional[int] = ..., ep_size: _Optional[int] = ..., expert_placement: _Optional[str] = ..., global_num_experts: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., engine_config: _Optional[_Union[EngineConfig, _Mapping]] = ..., quantize_recipe: _Optional[str] = ..., quantized_from: _Optional[str] = ...) -> None: ...

class EngineConfig(_message.Message):
    __slots__ = ("hidden_dim", "hidden_dim_unpadded", "intermediate_size_per_partition")
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_UNPADDED_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_PER_PARTITION_FIELD_NUMBER: _ClassVar[int]
    hidden_dim: int
    hidden_dim_unpadded: int
    intermediate_size_per_partition: int
    def __init__(self, hidden_dim: _Optional[int] = ..., hidden_dim_unpadded: _Optional[int] = ..., intermediate_size_per_partition: _Optional[int] = ...) -> None: ...

class DerivedScalars(_message.Message):
    __slots__ = ("w13_input_scale", "w2_input_scale", "g1_alphas", "g2_alphas", "a1_gscale", "a2_gscale", "g1_scale_c")
    W13_INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    W2_INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    G1_ALPHAS_FIELD_NUMBER: _ClassVar[int]
    G2_ALPHAS_FIELD_NUMBER: _ClassVar[int]
    A1_GSCALE_FIELD_NUMBER: _ClassVar[int]
    A2_GSCALE_FIELD_NUMBER: _ClassVar[int]
    G1_SCALE_C_FIELD_NUMBER: _ClassVar[int]
    w13_input_scale: _containers.RepeatedScalarFieldContainer[float]
    w2_input_scale: _containers.RepeatedScalarFieldContainer[float]
    g1_alphas: _containers.RepeatedScalarFieldContainer[float]
    g2_alphas: _containers.RepeatedScalarFieldContainer[float]
    a1_gscale: _containers.RepeatedScalarFieldContainer[float]
    a2_gscale: _containers.RepeatedScalarFieldContainer[float]
    g1_scale_c: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, w13_input_scale: _Optional[_Iterable[float]] = ..., w2_input_scale: _Optional[_Iterable[float]] = ..., g1_alphas: _Optional[_Iterable[float]] = ..., g2_alphas: _Optional[_Iterable[float]] = ..., a1_gscale: _Optional[_Iterable[float]] = ..., a2_gscale: _Optional[_Iterable[float]] = ..., g1_scale_c: _Optional[_Iterable[float]] = ...) -> None: ...

class PreparedHeader(_message.Message):
    __slots__ = ("layout", "scalars", "tensors", "cache_hit")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    layout: Layout
    scalars: DerivedScalars
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    cache_hit: bool
    def __init__(self, layout: _Optional[_Union[Layout, _Mapping]] = ..., scalars: _Optional[_Union[DerivedScalars, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("header", "chunk", "bulk", "ipc", "ipc_write", "written")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    IPC_WRITE_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    header: PreparedHeader
    chunk: TensorChunk
    bulk: BulkOffer
    ipc: IpcLayer
    ipc_write: IpcWrite
    written: IpcWritten
    def __init__(self, header: _Optional[_Union[PreparedHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., bulk: _Optional[_Union[BulkOffer, _Mapping]] = ..., ipc: _Optional[_Union[IpcLayer, _Mapping]] = ..., ipc_write: _Optional[_Union[IpcWrite, _Mapping]] = ..., written: _Optional[_Union[IpcWritten, _Mapping]] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendCapability(_message.Message):
    __slots__ = ("backend", "layout_versions", "profiles")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    layout_versions: _containers.RepeatedScalarFieldContainer[str]
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileCapability]
    def __init__(self, backend: _Optional[str] = ..., layout_versions: _Optional[_Iterable[str]] = ..., profiles: _Optional[_Iterable[_Union[ProfileCapability, _Mapping]]] = ...) -> None: ...

class ProfileCapability(_message.Message):
    __slots__ = ("profile", "activations", "gated_group_sizes", "flashinfer_release")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    GATED_GROUP_SIZES_FIELD_NUMBER: _ClassVar[int]
    FLASHINFER_RELEASE_FIELD_NUMBER: _ClassVar[int]
    profile: str
    activations: _containers.RepeatedScalarFieldContainer[str]
    gated_group_sizes: _containers.RepeatedScalarFieldContainer[int]
    flashinfer_release: str
    def __init__(self, profile: _Optional[str] = ..., activations: _Optional[_Iterable[str]] = ..., gated_group_sizes: _Optional[_Iterable[int]] = ..., flashinfer_release: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "name", "compute_capability", "memory_budget_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    compute_capability: str
    memory_budget_bytes: int
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., compute_capability: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("chunk_size", "max_receive_message_bytes", "max_send_message_bytes", "max_request_bytes", "cache_bytes", "max_tensors", "max_tensor_rank", "max_tensor_bytes", "max_concurrent", "max_concurrent_per_client", "max_deadline_seconds")
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    max_receive_message_bytes: int
    max_send_message_bytes: int
    max_request_bytes: int
    cache_bytes: int
    max_tensors: int
    max_tensor_rank: int
    max_tensor_bytes: int
    max_concurrent: int
    max_concurrent_per_client: int
    max_deadline_seconds: float
    def __init__(self, chunk_size: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ..., max_send_message_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., max_tensors: _Optional[int] = ..., max_tensor_rank: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., max_concurrent_per_client: _Optional[int] = ..., max_deadline_seconds: _Optional[float] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("api", "package_version", "torch_version", "flashinfer_version", "pipeline_version", "flashinfer_layout_version", "devices", "backends", "activations", "input_scale_policies", "tensor_forms", "checkpoint_refs", "limits", "quantize_recipes", "bulk_port")
    API_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLASHINFER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLASHINFER_LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_POLICIES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FORMS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_REFS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_RECIPES_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    api: str
    package_version: str
    torch_version: str
    flashinfer_version: str
    pipeline_version: str
    flashinfer_layout_version: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    backends: _containers.RepeatedCompositeFieldContainer[BackendCapability]
    activations: _containers.RepeatedScalarFieldContainer[str]
    input_scale_policies: _containers.RepeatedScalarFieldContainer[str]
    tensor_forms: _containers.RepeatedScalarFieldContainer[TensorForm]
    checkpoint_refs: bool
    limits: Limits
    quantize_recipes: _containers.RepeatedScalarFieldContainer[str]
    bulk_port: int
    def __init__(self, api: _Optional[str] = ..., package_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., flashinfer_version: _Optional[str] = ..., pipeline_version: _Optional[str] = ..., flashinfer_layout_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., backends: _Optional[_Iterable[_Union[BackendCapability, _Mapping]]] = ..., activations: _Optional[_Iterable[str]] = ..., input_scale_policies: _Optional[_Iterable[str]] = ..., tensor_forms: _Optional[_Iterable[_Union[TensorForm, str]]] = ..., checkpoint_refs: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., quantize_recipes: _Optional[_Iterable[str]] = ..., bulk_port: _Optional[int] = ...) -> None: ...
