from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("n_train", "n_val", "software_version")
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    N_VAL_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    n_train: int
    n_val: int
    software_version: str
    def __init__(self, n_train: _Optional[int] = ..., n_val: _Optional[int] = ..., software_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("site", "federation_id", "config_json")
    SITE_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    site: str
    federation_id: str
    config_json: str
    def __init__(self, site: _Optional[str] = ..., federation_id: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("last_completed_round",)
    LAST_COMPLETED_ROUND_FIELD_NUMBER: _ClassVar[int]
    last_completed_round: int
    def __init__(self, last_completed_round: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "model_sha256", "config_json", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        STOP: _ClassVar[Task.Kind]
    WAIT: Task.Kind
    TRAIN: Task.Kind
    STOP: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    model_sha256: str
    config_json: str
    message: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., model_sha256: _Optional[str] = ..., config_json: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "n_examples", "metrics_json")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    N_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    round: int
    n_examples: int
    metrics_json: str
    def __init__(self, round: _Optional[int] = ..., n_examples: _Optional[int] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data", "offset", "total_bytes", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    offset: int
    total_bytes: int
    sha256: str
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "reason", "sha256")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    sha256: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...
