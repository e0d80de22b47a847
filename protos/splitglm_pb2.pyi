from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    FP32: _ClassVar[Codec]
    FP16: _ClassVar[Codec]
    INT8: _ClassVar[Codec]
    INT8_OUTLIERS: _ClassVar[Codec]
    INT4_OUTLIERS: _ClassVar[Codec]
    ROT_INT4_OUTLIERS: _ClassVar[Codec]
    EC_OUTLIERS: _ClassVar[Codec]
    GR_OUTLIERS: _ClassVar[Codec]

class Entropy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTROPY_NONE: _ClassVar[Entropy]
    ENTROPY_DEFLATE: _ClassVar[Entropy]

class Speculate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECULATE_DEFAULT: _ClassVar[Speculate]
    SPECULATE_ON: _ClassVar[Speculate]
    SPECULATE_OFF: _ClassVar[Speculate]

class Path(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATH_UNSPECIFIED: _ClassVar[Path]
    ACCURATE: _ClassVar[Path]
    FAST: _ClassVar[Path]
CODEC_UNSPECIFIED: Codec
FP32: Codec
FP16: Codec
INT8: Codec
INT8_OUTLIERS: Codec
INT4_OUTLIERS: Codec
ROT_INT4_OUTLIERS: Codec
EC_OUTLIERS: Codec
GR_OUTLIERS: Codec
ENTROPY_NONE: Entropy
ENTROPY_DEFLATE: Entropy
SPECULATE_DEFAULT: Speculate
SPECULATE_ON: Speculate
SPECULATE_OFF: Speculate
PATH_UNSPECIFIED: Path
ACCURATE: Path
FAST: Path

class EncodedTensor(_message.Message):
    __slots__ = ("codec", "shape", "values", "scales", "outlier_index", "outlier_values", "outliers_per_token", "group_size", "rotation_block", "rotation_seed", "entropy", "channel_class", "stream_bytes", "rice_parameter")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    OUTLIERS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROTATION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_CLASS_FIELD_NUMBER: _ClassVar[int]
    STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RICE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    codec: Codec
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    scales: bytes
    outlier_index: bytes
    outlier_values: bytes
    outliers_per_token: int
    group_size: int
    rotation_block: int
    rotation_seed: int
    entropy: Entropy
    channel_class: bytes
    stream_bytes: _containers.RepeatedScalarFieldContainer[int]
    rice_parameter: bytes
    def __init__(self, codec: _Optional[_Union[Codec, str]] = ..., shape: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., outlier_index: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ..., outliers_per_token: _Optional[int] = ..., group_size: _Optional[int] = ..., rotation_block: _Optional[int] = ..., rotation_seed: _Optional[int] = ..., entropy: _Optional[_Union[Entropy, str]] = ..., channel_class: _Optional[bytes] = ..., stream_bytes: _Optional[_Iterable[int]] = ..., rice_parameter: _Optional[bytes] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids", "policy", "latency_budget_ms", "token_budget_ms", "speculate", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "top_logprobs", "grammar", "generated_tokens")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    policy: str
    latency_budget_ms: int
    token_budget_ms: int
    speculate: Speculate
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    top_logprobs: int
    grammar: Grammar
    generated_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., policy: _Optional[str] = ..., latency_budget_ms: _Optional[int] = ..., token_budget_ms: _Optional[int] = ..., speculate: _Optional[_Union[Speculate, str]] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., top_logprobs: _Optional[int] = ..., grammar: _Optional[_Union[Grammar, _Mapping]] = ..., generated_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Grammar(_message.Message):
    __slots__ = ("kind", "text")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    text: str
    def __init__(self, kind: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_id", "seq", "start_pos", "hidden", "params", "deadline_unix_ms", "close", "reply_to", "draft_tokens", "fork_of", "traceparent")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORK_OF_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    start_pos: int
    hidden: EncodedTensor
    params: GenerationParams
    deadline_unix_ms: int
    close: bool
    reply_to: str
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    fork_of: str
    traceparent: str
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., start_pos: _Optional[int] = ..., hidden: _Optional[_Union[EncodedTensor, _Mapping]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., close: _Optional[bool] = ..., reply_to: _Optional[str] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., fork_of: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("session_id", "seq", "tokens", "logprobs", "path", "timings_ms", "finished", "error", "status", "edge_id", "degraded", "predicted_ms", "switch_reason", "policy", "drafted", "accepted", "draft_tokens", "next_pos", "top_logprobs")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_POS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    path: Path
    timings_ms: _containers.ScalarMap[str, float]
    finished: bool
    error: str
    status: int
    edge_id: str
    degraded: bool
    predicted_ms: float
    switch_reason: str
    policy: str
    drafted: int
    accepted: int
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    next_pos: int
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., path: _Optional[_Union[Path, str]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., finished: _Optional[bool] = ..., error: _Optional[str] = ..., status: _Optional[int] = ..., edge_id: _Optional[str] = ..., degraded: _Optional[bool] = ..., predicted_ms: _Optional[float] = ..., switch_reason: _Optional[str] = ..., policy: _Optional[str] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., next_pos: _Optional[int] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("tokens", "logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...
