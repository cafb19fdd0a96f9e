from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_MAILBOX: _ClassVar[Mode]
    MODE_SHUFFLED: _ClassVar[Mode]
    MODE_PLAINTEXT: _ClassVar[Mode]
    MODE_DENSE: _ClassVar[Mode]

class SlotKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_KIND_UNSPECIFIED: _ClassVar[SlotKind]
    SLOT_KIND_PSEUDONYM: _ClassVar[SlotKind]
    SLOT_KIND_AGGREGATE: _ClassVar[SlotKind]
MODE_UNSPECIFIED: Mode
MODE_MAILBOX: Mode
MODE_SHUFFLED: Mode
MODE_PLAINTEXT: Mode
MODE_DENSE: Mode
SLOT_KIND_UNSPECIFIED: SlotKind
SLOT_KIND_PSEUDONYM: SlotKind
SLOT_KIND_AGGREGATE: SlotKind

class RoundRef(_message.Message):
    __slots__ = ("round_id", "phase")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    phase: str
    def __init__(self, round_id: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class DeviceId(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    def __init__(self, value: _Optional[bytes] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "reason", "detail", "round")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    detail: str
    round: RoundRef
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., round: _Optional[_Union[RoundRef, _Mapping]] = ...) -> None: ...

class Codec(_message.Message):
    __slots__ = ("frac_bits", "max_abs", "max_summands")
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUMMANDS_FIELD_NUMBER: _ClassVar[int]
    frac_bits: int
    max_abs: float
    max_summands: int
    def __init__(self, frac_bits: _Optional[int] = ..., max_abs: _Optional[float] = ..., max_summands: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("deployment_id", "mode", "codec", "coordinator_public", "aggregator_public", "deployment_key")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    mode: Mode
    codec: Codec
    coordinator_public: bytes
    aggregator_public: bytes
    deployment_key: bytes
    def __init__(self, deployment_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., codec: _Optional[_Union[Codec, _Mapping]] = ..., coordinator_public: _Optional[bytes] = ..., aggregator_public: _Optional[bytes] = ..., deployment_key: _Optional[bytes] = ...) -> None: ...

class PhaseSpec(_message.Message):
    __slots__ = ("name", "kind", "dim", "items_per_device", "aggregate_slots", "group_slots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SLOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: SlotKind
    dim: int
    items_per_device: int
    aggregate_slots: _containers.RepeatedScalarFieldContainer[str]
    group_slots: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[SlotKind, str]] = ..., dim: _Optional[int] = ..., items_per_device: _Optional[int] = ..., aggregate_slots: _Optional[_Iterable[str]] = ..., group_slots: _Optional[int] = ...) -> None: ...

class ModelParameters(_message.Message):
    __slots__ = ("names", "values", "version")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class Fragment(_message.Message):
    __slots__ = ("index", "count", "total_bytes", "sha256")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    total_bytes: int
    sha256: bytes
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...
