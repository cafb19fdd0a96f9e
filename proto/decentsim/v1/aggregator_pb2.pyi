from proto.decentsim.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgreementStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGREEMENT_STEP_UNSPECIFIED: _ClassVar[AgreementStep]
    AGREEMENT_STEP_OFFER: _ClassVar[AgreementStep]
    AGREEMENT_STEP_FIX: _ClassVar[AgreementStep]
AGREEMENT_STEP_UNSPECIFIED: AgreementStep
AGREEMENT_STEP_OFFER: AgreementStep
AGREEMENT_STEP_FIX: AgreementStep

class LinkReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class LinkChunk(_message.Message):
    __slots__ = ("fragment", "payload")
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    fragment: _common_pb2.Fragment
    payload: bytes
    def __init__(self, fragment: _Optional[_Union[_common_pb2.Fragment, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ("round_id", "phases", "payload")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    phases: _containers.RepeatedCompositeFieldContainer[_common_pb2.PhaseSpec]
    payload: bytes
    def __init__(self, round_id: _Optional[int] = ..., phases: _Optional[_Iterable[_Union[_common_pb2.PhaseSpec, _Mapping]]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RelayedRegistration(_message.Message):
    __slots__ = ("device", "slot_count", "payload")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    slot_count: int
    payload: bytes
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., slot_count: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RelayRegistrationsRequest(_message.Message):
    __slots__ = ("round_id", "registrations")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    registrations: _containers.RepeatedCompositeFieldContainer[RelayedRegistration]
    def __init__(self, round_id: _Optional[int] = ..., registrations: _Optional[_Iterable[_Union[RelayedRegistration, _Mapping]]] = ...) -> None: ...

class RelayRegistrationsResponse(_message.Message):
    __slots__ = ("payloads",)
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CloseRegistrationRequest(_message.Message):
    __slots__ = ("round_id", "slot_count", "payload")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    slot_count: int
    payload: bytes
    def __init__(self, round_id: _Optional[int] = ..., slot_count: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RelayChunk(_message.Message):
    __slots__ = ("round", "mode", "post_count", "item_count", "fragment", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    POST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    mode: _common_pb2.Mode
    post_count: int
    item_count: int
    fragment: _common_pb2.Fragment
    payload: bytes
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., post_count: _Optional[int] = ..., item_count: _Optional[int] = ..., fragment: _Optional[_Union[_common_pb2.Fragment, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class DigestChunk(_message.Message):
    __slots__ = ("round", "step", "digest", "key_count", "fragment", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    step: AgreementStep
    digest: bytes
    key_count: int
    fragment: _common_pb2.Fragment
    payload: bytes
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., step: _Optional[_Union[AgreementStep, str]] = ..., digest: _Optional[bytes] = ..., key_count: _Optional[int] = ..., fragment: _Optional[_Union[_common_pb2.Fragment, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReleaseSumsRequest(_message.Message):
    __slots__ = ("round", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    payload: bytes
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RelayedFetch(_message.Message):
    __slots__ = ("device", "slot_ids", "payload")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    device: _common_pb2.DeviceId
    slot_ids: bytes
    payload: bytes
    def __init__(self, device: _Optional[_Union[_common_pb2.DeviceId, _Mapping]] = ..., slot_ids: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RelayFetchesRequest(_message.Message):
    __slots__ = ("round", "fetches")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    round: _common_pb2.RoundRef
    fetches: _containers.RepeatedCompositeFieldContainer[RelayedFetch]
    def __init__(self, round: _Optional[_Union[_common_pb2.RoundRef, _Mapping]] = ..., fetches: _Optional[_Iterable[_Union[RelayedFetch, _Mapping]]] = ...) -> None: ...

class RelayFetchesResponse(_message.Message):
    __slots__ = ("payloads",)
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...
