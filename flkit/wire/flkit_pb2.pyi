from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_READY: _ClassVar[TaskStatus]
    NO_TASK_YET: _ClassVar[TaskStatus]
    JOB_FINISHED: _ClassVar[TaskStatus]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_READY: TaskStatus
NO_TASK_YET: TaskStatus
JOB_FINISHED: TaskStatus

class JoinRequest(_message.Message):
    __slots__ = ("site_name", "job_id", "token", "protocol_version")
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    site_name: str
    job_id: str
    token: str
    protocol_version: int
    def __init__(self, site_name: _Optional[str] = ..., job_id: _Optional[str] = ..., token: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session_id", "job_config_json", "heartbeat_interval_s", "offers")
    class OffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    job_config_json: str
    heartbeat_interval_s: float
    offers: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., job_config_json: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., offers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("session_id", "wait_s", "header_only", "params_by_file", "released_files")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    HEADER_ONLY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_BY_FILE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FILES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    wait_s: float
    header_only: bool
    params_by_file: bool
    released_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., wait_s: _Optional[float] = ..., header_only: _Optional[bool] = ..., params_by_file: _Optional[bool] = ..., released_files: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("status", "task_id", "task_name", "current_round", "total_rounds", "start_round", "params_type", "meta_json", "payload_size", "end_reason", "job_failed", "params_file")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    START_ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TYPE_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    JOB_FAILED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FILE_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    task_id: str
    task_name: str
    current_round: int
    total_rounds: int
    start_round: int
    params_type: str
    meta_json: str
    payload_size: int
    end_reason: str
    job_failed: bool
    params_file: str
    def __init__(self, status: _Optional[_Union[TaskStatus, str]] = ..., task_id: _Optional[str] = ..., task_name: _Optional[str] = ..., current_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., start_round: _Optional[int] = ..., params_type: _Optional[str] = ..., meta_json: _Optional[str] = ..., payload_size: _Optional[int] = ..., end_reason: _Optional[str] = ..., job_failed: _Optional[bool] = ..., params_file: _Optional[str] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("session_id", "task_id", "params_type", "metrics_json", "meta_json", "payload_size", "params_file", "released_files")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FILE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FILES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    params_type: str
    metrics_json: str
    meta_json: str
    payload_size: int
    params_file: str
    released_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., params_type: _Optional[str] = ..., metrics_json: _Optional[str] = ..., meta_json: _Optional[str] = ..., payload_size: _Optional[int] = ..., params_file: _Optional[str] = ..., released_files: _Optional[_Iterable[str]] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "error", "job_ended")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JOB_ENDED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    error: str
    job_ended: bool
    def __init__(self, accepted: _Optional[bool] = ..., error: _Optional[str] = ..., job_ended: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("job_running",)
    JOB_RUNNING_FIELD_NUMBER: _ClassVar[int]
    job_running: bool
    def __init__(self, job_running: _Optional[bool] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("session_id", "site_name", "job_id", "token", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    site_name: str
    job_id: str
    token: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., site_name: _Optional[str] = ..., job_id: _Optional[str] = ..., token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MetricsBatch(_message.Message):
    __slots__ = ("session_id", "records_json")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    records_json: str
    def __init__(self, session_id: _Optional[str] = ..., records_json: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("last_rounds",)
    LAST_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    last_rounds: int
    def __init__(self, last_rounds: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: str
    def __init__(self, status_json: _Optional[str] = ...) -> None: ...
