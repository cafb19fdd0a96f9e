from proto.decentsim.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrolRequest(_message.Message):
    __slots__ = ("token", "csr_der", "device_count", "agent_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_der: bytes
    device_count: int
    agent_version: str
    def __init__(self, token: _Optional[str] = ..., csr_der: _Optional[bytes] = ..., device_count: _Optional[int] = ..., agent_version: _Optional[str] = ...) -> None: ...

class EnrolResponse(_message.Message):
    __slots__ = ("credential_id", "devices", "client_certificate_der", "ca_certificates_der", "deployment", "issued_unix_ms", "expires_unix_ms", "deployments")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATES_DER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceId]
    client_certificate_der: bytes
    ca_certificates_der: _containers.RepeatedScalarFieldContainer[bytes]
    deployment: _common_pb2.Deployment
    issued_unix_ms: int
    expires_unix_ms: int
    deployments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Deployment]
    def __init__(self, credential_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[_common_pb2.DeviceId, _Mapping]]] = ..., client_certificate_der: _Optional[bytes] = ..., ca_certificates_der: _Optional[_Iterable[bytes]] = ..., deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ..., issued_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., deployments: _Optional[_Iterable[_Union[_common_pb2.Deployment, _Mapping]]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id", "newer_than", "wait_ms")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NEWER_THAN_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    newer_than: int
    wait_ms: int
    def __init__(self, round_id: _Optional[int] = ..., newer_than: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class PhaseSchedule(_message.Message):
    __slots__ = ("spec", "opens_unix_ms", "deadline_unix_ms", "fetch_deadline_unix_ms", "components")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OPENS_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.PhaseSpec
    opens_unix_ms: int
    deadline_unix_ms: int
    fetch_deadline_unix_ms: int
    components: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spec: _Optional[_Union[_common_pb2.PhaseSpec, _Mapping]] = ..., opens_unix_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., fetch_deadline_unix_ms: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ...) -> None: ...

class RoundSchedule(_message.Message):
    __slots__ = ("round_id", "day", "epoch", "days", "mode", "theta", "model", "rng_seed", "registration_deadline_unix_ms", "contact_window_start_unix_ms", "contact_window_end_unix_ms", "en_interval_number", "en_interval_count", "phases", "round_deadline_unix_ms", "spec_digest", "server_time_unix_ms", "step", "step_deadline_unix_ms", "version", "run_json", "committed_days", "failure", "behaviour_row", "behaviour_period")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RNG_SEED_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONTACT_WINDOW_START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CONTACT_WINDOW_END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EN_INTERVAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    EN_INTERVAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_JSON_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_DAYS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_ROW_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_PERIOD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    day: int
    epoch: int
    days: int
    mode: _common_pb2.Mode
    theta: _common_pb2.ModelParameters
    model: str
    rng_seed: int
    registration_deadline_unix_ms: int
    contact_window_start_unix_ms: int
    contact_window_end_unix_ms: int
    en_interval_number: int
    en_interval_count: int
    phases: _containers.RepeatedCompositeFieldContainer[PhaseSchedule]
    round_deadline_unix_ms: int
    spec_digest: bytes
    server_time_unix_ms: int
    step: str
    step_deadline_unix_ms: int
    version: int
    run_json: str
    committed_days: int
    failure: str
    behaviour_row: bytes
    behaviour_period: int
    def __init__(self, round_id: _Optional[int] = ..., day: _Optional[int] = ..., epoch: _Optional[int] = ..., days: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., theta: _Optional[_Union[_common_pb2.ModelParameters, _Mapping]] = ..., model: _Optional[str] = ..., rng_seed: _Optional[int] = ..., registration_deadline_unix_ms: _Optional[int] = ..., contact_window_start_unix_ms: _Optional[int] = ..., contact_window_end_unix_ms: _Optional[int] = ..., en_interval_number: _Optional[int] = ..., en_interval_count: _Optional[int] = ..., phases: _Optional[_Iterable[_Union[PhaseSchedule, _Mapping]]] = ..., round_deadline_unix_ms: _Optional[int] = ..., spec_digest: _Optional[bytes] = ..., server_time_unix_ms: _Optional[int] = ..., step: _Optional[str] = ..., step_deadline_unix_ms: _Optional[int] = ..., version: _Optional[int] = ..., run_json: _Optional[str] = ..., committed_days: _Optional[int] = ..., failure: _Optional[str] = ..., behaviour_row: _Optional[bytes] = ..., behaviour_period: _Optional[int] = ...) -> None: ...

class SlotRegistration(_message.Message):
    __slots__ = ("device", "slot_count", "payload")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    slot_count: int
    payload: bytes
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., slot_count: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RegisterSlotsRequest(_message.Message):
    __slots__ = ("round_id", "registrations")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    registrations: _containers.RepeatedCompositeFieldContainer[SlotRegistration]
    def __init__(self, round_id: _Optional[int] = ..., registrations: _Optional[_Iterable[_Union[SlotRegistration, _Mapping]]] = ...) -> None: ...

class RegistrationResult(_message.Message):
    __slots__ = ("device", "payload", "error")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    payload: bytes
    error: _common_pb2.ErrorDetail
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class RegisterSlotsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RegistrationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RegistrationResult, _Mapping]]] = ...) -> None: ...

class GetDirectoryRequest(_message.Message):
    __slots__ = ("round_id", "start", "max_slots", "payload")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    start: int
    max_slots: int
    payload: bytes
    def __init__(self, round_id: _Optional[int] = ..., start: _Optional[int] = ..., max_slots: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class DirectoryPage(_message.Message):
    __slots__ = ("round_id", "start", "total_slots", "directory_digest", "payload")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    start: int
    total_slots: int
    directory_digest: bytes
    payload: bytes
    def __init__(self, round_id: _Optional[int] = ..., start: _Optional[int] = ..., total_slots: _Optional[int] = ..., directory_digest: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SharePost(_message.Message):
    __slots__ = ("device", "item_count", "dim", "payload")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    item_count: int
    dim: int
    payload: bytes
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., item_count: _Optional[int] = ..., dim: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PostSharesRequest(_message.Message):
    __slots__ = ("round", "posts")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POSTS_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    posts: _containers.RepeatedCompositeFieldContainer[SharePost]
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., posts: _Optional[_Iterable[_Union[SharePost, _Mapping]]] = ...) -> None: ...

class PostResult(_message.Message):
    __slots__ = ("device", "payload", "error")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    payload: bytes
    error: _common_pb2.ErrorDetail
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class PostSharesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PostResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PostResult, _Mapping]]] = ...) -> None: ...

class SubmitAggregatesRequest(_message.Message):
    __slots__ = ("round", "posts")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POSTS_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    posts: _containers.RepeatedCompositeFieldContainer[SharePost]
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., posts: _Optional[_Iterable[_Union[SharePost, _Mapping]]] = ...) -> None: ...

class SubmitAggregatesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PostResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PostResult, _Mapping]]] = ...) -> None: ...

class SlotFetch(_message.Message):
    __slots__ = ("device", "slot_ids", "payload")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    slot_ids: bytes
    payload: bytes
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., slot_ids: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class FetchSumsRequest(_message.Message):
    __slots__ = ("round", "fetches")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    fetches: _containers.RepeatedCompositeFieldContainer[SlotFetch]
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., fetches: _Optional[_Iterable[_Union[SlotFetch, _Mapping]]] = ...) -> None: ...

class FetchResult(_message.Message):
    __slots__ = ("device", "slot_ids", "payload", "error")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    slot_ids: bytes
    payload: bytes
    error: _common_pb2.ErrorDetail
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., slot_ids: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class FetchSumsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FetchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[FetchResult, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("devices", "progress", "client_time_unix_ms", "health")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceId]
    progress: _common_pb2.RoundRef
    client_time_unix_ms: int
    health: DeviceHealth
    def __init__(self, devices: _Optional[_Iterable[_Union[_common_pb2.DeviceId, _Mapping]]] = ..., progress: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., client_time_unix_ms: _Optional[int] = ..., health: _Optional[_Union[DeviceHealth, _Mapping]] = ...) -> None: ...

class DeviceHealth(_message.Message):
    __slots__ = ("agent_version", "scanner_healthy", "scanner_last_success_age_s", "advertiser_last_rotation_age_s", "privacy_alarm", "radio_reopened", "battery_bucket", "free_disk_bucket")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCANNER_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    SCANNER_LAST_SUCCESS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ADVERTISER_LAST_ROTATION_AGE_S_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_ALARM_FIELD_NUMBER: _ClassVar[int]
    RADIO_REOPENED_FIELD_NUMBER: _ClassVar[int]
    BATTERY_BUCKET_FIELD_NUMBER: _ClassVar[int]
    FREE_DISK_BUCKET_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    scanner_healthy: bool
    scanner_last_success_age_s: float
    advertiser_last_rotation_age_s: float
    privacy_alarm: bool
    radio_reopened: int
    battery_bucket: int
    free_disk_bucket: int
    def __init__(self, agent_version: _Optional[str] = ..., scanner_healthy: _Optional[bool] = ..., scanner_last_success_age_s: _Optional[float] = ..., advertiser_last_rotation_age_s: _Optional[float] = ..., privacy_alarm: _Optional[bool] = ..., radio_reopened: _Optional[int] = ..., battery_bucket: _Optional[int] = ..., free_disk_bucket: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time_unix_ms", "current", "phase_deadline_unix_ms", "next_heartbeat_ms", "max_wait_ms", "unknown_devices", "draining")
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PHASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NEXT_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    server_time_unix_ms: int
    current: _common_pb2.RoundRef
    phase_deadline_unix_ms: int
    next_heartbeat_ms: int
    max_wait_ms: int
    unknown_devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceId]
    draining: bool
    def __init__(self, server_time_unix_ms: _Optional[int] = ..., current: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., phase_deadline_unix_ms: _Optional[int] = ..., next_heartbeat_ms: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., unknown_devices: _Optional[_Iterable[_Union[_common_pb2.DeviceId, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("round_id", "step", "reason", "detail")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    step: str
    reason: str
    detail: str
    def __init__(self, round_id: _Optional[int] = ..., step: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("current",)
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    current: bool
    def __init__(self, current: _Optional[bool] = ...) -> None: ...
