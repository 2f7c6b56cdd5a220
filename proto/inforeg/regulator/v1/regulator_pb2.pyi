from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fallback(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_UNSPECIFIED: _ClassVar[Fallback]
    FALLBACK_NEUTRAL: _ClassVar[Fallback]
    FALLBACK_LAST: _ClassVar[Fallback]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_OPEN: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]
    SESSION_STATE_SUPERSEDED: _ClassVar[SessionState]
    SESSION_STATE_EXPIRED: _ClassVar[SessionState]
    SESSION_STATE_CORRUPT: _ClassVar[SessionState]
FALLBACK_UNSPECIFIED: Fallback
FALLBACK_NEUTRAL: Fallback
FALLBACK_LAST: Fallback
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_OPEN: SessionState
SESSION_STATE_CLOSED: SessionState
SESSION_STATE_SUPERSEDED: SessionState
SESSION_STATE_EXPIRED: SessionState
SESSION_STATE_CORRUPT: SessionState

class PaperProfile(_message.Message):
    __slots__ = ("beta", "threshold", "warmup_epochs")
    BETA_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    beta: float
    threshold: float
    warmup_epochs: int
    def __init__(self, beta: _Optional[float] = ..., threshold: _Optional[float] = ..., warmup_epochs: _Optional[int] = ...) -> None: ...

class OfficialProfile(_message.Message):
    __slots__ = ("reference_modality", "threshold", "history", "reference_gain", "other_gain", "arithmetic")
    REFERENCE_MODALITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_GAIN_FIELD_NUMBER: _ClassVar[int]
    OTHER_GAIN_FIELD_NUMBER: _ClassVar[int]
    ARITHMETIC_FIELD_NUMBER: _ClassVar[int]
    reference_modality: str
    threshold: float
    history: int
    reference_gain: float
    other_gain: float
    arithmetic: str
    def __init__(self, reference_modality: _Optional[str] = ..., threshold: _Optional[float] = ..., history: _Optional[int] = ..., reference_gain: _Optional[float] = ..., other_gain: _Optional[float] = ..., arithmetic: _Optional[str] = ...) -> None: ...

class NoneProfile(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OgmGeProfile(_message.Message):
    __slots__ = ("alpha", "start_epoch", "end_epoch", "noise")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    START_EPOCH_FIELD_NUMBER: _ClassVar[int]
    END_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    start_epoch: int
    end_epoch: int
    noise: bool
    def __init__(self, alpha: _Optional[float] = ..., start_epoch: _Optional[int] = ..., end_epoch: _Optional[int] = ..., noise: bool = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("paper", "official", "none", "ogm_ge", "plugin")
    PAPER_FIELD_NUMBER: _ClassVar[int]
    OFFICIAL_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    OGM_GE_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    paper: PaperProfile
    official: OfficialProfile
    none: NoneProfile
    ogm_ge: OgmGeProfile
    plugin: _any_pb2.Any
    def __init__(self, paper: _Optional[_Union[PaperProfile, _Mapping]] = ..., official: _Optional[_Union[OfficialProfile, _Mapping]] = ..., none: _Optional[_Union[NoneProfile, _Mapping]] = ..., ogm_ge: _Optional[_Union[OgmGeProfile, _Mapping]] = ..., plugin: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class FisherTerms(_message.Message):
    __slots__ = ("grad_sq", "grad_delta", "delta_sq")
    GRAD_SQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_SQ_FIELD_NUMBER: _ClassVar[int]
    grad_sq: float
    grad_delta: float
    delta_sq: float
    def __init__(self, grad_sq: _Optional[float] = ..., grad_delta: _Optional[float] = ..., delta_sq: _Optional[float] = ...) -> None: ...

class ModalityStats(_message.Message):
    __slots__ = ("modality", "score_sum", "fisher", "fisher_terms", "fisher_deferred", "applied")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_SUM_FIELD_NUMBER: _ClassVar[int]
    FISHER_FIELD_NUMBER: _ClassVar[int]
    FISHER_TERMS_FIELD_NUMBER: _ClassVar[int]
    FISHER_DEFERRED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    modality: str
    score_sum: float
    fisher: float
    fisher_terms: FisherTerms
    fisher_deferred: bool
    applied: Factors
    def __init__(self, modality: _Optional[str] = ..., score_sum: _Optional[float] = ..., fisher: _Optional[float] = ..., fisher_terms: _Optional[_Union[FisherTerms, _Mapping]] = ..., fisher_deferred: bool = ..., applied: _Optional[_Union[Factors, _Mapping]] = ...) -> None: ...

class MeasuredFisher(_message.Message):
    __slots__ = ("step", "modalities")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    step: int
    modalities: _containers.RepeatedCompositeFieldContainer[ModalityFisher]
    def __init__(self, step: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[ModalityFisher, _Mapping]]] = ...) -> None: ...

class ModalityFisher(_message.Message):
    __slots__ = ("modality", "fisher")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    FISHER_FIELD_NUMBER: _ClassVar[int]
    modality: str
    fisher: float
    def __init__(self, modality: _Optional[str] = ..., fisher: _Optional[float] = ...) -> None: ...

class Factors(_message.Message):
    __slots__ = ("proximal", "grad_scale", "noise_scale")
    PROXIMAL_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    proximal: float
    grad_scale: float
    noise_scale: float
    def __init__(self, proximal: _Optional[float] = ..., grad_scale: _Optional[float] = ..., noise_scale: _Optional[float] = ...) -> None: ...

class ModalityStep(_message.Message):
    __slots__ = ("modality", "score_sum", "fisher", "factors")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_SUM_FIELD_NUMBER: _ClassVar[int]
    FISHER_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    modality: str
    score_sum: float
    fisher: float
    factors: Factors
    def __init__(self, modality: _Optional[str] = ..., score_sum: _Optional[float] = ..., fisher: _Optional[float] = ..., factors: _Optional[_Union[Factors, _Mapping]] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("epoch", "step", "count", "modalities", "fallback")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    count: int
    modalities: _containers.RepeatedCompositeFieldContainer[ModalityStep]
    fallback: Fallback
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., count: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[ModalityStep, _Mapping]]] = ..., fallback: _Optional[_Union[Fallback, str]] = ...) -> None: ...

class ModalityWindow(_message.Message):
    __slots__ = ("modality", "open", "growth")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    GROWTH_FIELD_NUMBER: _ClassVar[int]
    modality: str
    open: bool
    growth: float
    def __init__(self, modality: _Optional[str] = ..., open: bool = ..., growth: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "world_size", "modalities", "profile", "resume_epoch", "next_attempt", "open_token", "snapshot")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    RESUME_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OPEN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    world_size: int
    modalities: _containers.RepeatedScalarFieldContainer[str]
    profile: Profile
    resume_epoch: int
    next_attempt: bool
    open_token: str
    snapshot: SessionSnapshot
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., world_size: _Optional[int] = ..., modalities: _Optional[_Iterable[str]] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., resume_epoch: _Optional[int] = ..., next_attempt: bool = ..., open_token: _Optional[str] = ..., snapshot: _Optional[_Union[SessionSnapshot, _Mapping]] = ...) -> None: ...

class SessionSnapshot(_message.Message):
    __slots__ = ("modalities", "profile", "epochs")
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    modalities: _containers.RepeatedScalarFieldContainer[str]
    profile: Profile
    epochs: _containers.RepeatedCompositeFieldContainer[EpochRecord]
    def __init__(self, modalities: _Optional[_Iterable[str]] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., epochs: _Optional[_Iterable[_Union[EpochRecord, _Mapping]]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("job_id", "attempt", "world_size", "modalities", "profile", "state", "epoch", "last_step", "steps", "window", "created_unix_ms", "last_active_unix_ms", "resume_epoch", "state_reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    world_size: int
    modalities: _containers.RepeatedScalarFieldContainer[str]
    profile: Profile
    state: SessionState
    epoch: int
    last_step: int
    steps: int
    window: _containers.RepeatedCompositeFieldContainer[ModalityWindow]
    created_unix_ms: int
    last_active_unix_ms: int
    resume_epoch: int
    state_reason: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., world_size: _Optional[int] = ..., modalities: _Optional[_Iterable[str]] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., epoch: _Optional[int] = ..., last_step: _Optional[int] = ..., steps: _Optional[int] = ..., window: _Optional[_Iterable[_Union[ModalityWindow, _Mapping]]] = ..., created_unix_ms: _Optional[int] = ..., last_active_unix_ms: _Optional[int] = ..., resume_epoch: _Optional[int] = ..., state_reason: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session", "created")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    created: bool
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., created: bool = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "epoch", "step", "count", "stats", "fallback", "measured")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    epoch: int
    step: int
    count: int
    stats: _containers.RepeatedCompositeFieldContainer[ModalityStats]
    fallback: Fallback
    measured: _containers.RepeatedCompositeFieldContainer[MeasuredFisher]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., count: _Optional[int] = ..., stats: _Optional[_Iterable[_Union[ModalityStats, _Mapping]]] = ..., fallback: _Optional[_Union[Fallback, str]] = ..., measured: _Optional[_Iterable[_Union[MeasuredFisher, _Mapping]]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("step", "window", "duplicate")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    step: StepRecord
    window: _containers.RepeatedCompositeFieldContainer[ModalityWindow]
    duplicate: bool
    def __init__(self, step: _Optional[_Union[StepRecord, _Mapping]] = ..., window: _Optional[_Iterable[_Union[ModalityWindow, _Mapping]]] = ..., duplicate: bool = ...) -> None: ...

class EndEpochRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "epoch", "measured")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    epoch: int
    measured: MeasuredFisher
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., epoch: _Optional[int] = ..., measured: _Optional[_Union[MeasuredFisher, _Mapping]] = ...) -> None: ...

class ModalityEpoch(_message.Message):
    __slots__ = ("modality", "fisher_trace", "window", "regulated_steps", "mean_proximal", "max_proximal", "mean_score")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    FISHER_TRACE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    REGULATED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_PROXIMAL_FIELD_NUMBER: _ClassVar[int]
    MAX_PROXIMAL_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    modality: str
    fisher_trace: float
    window: ModalityWindow
    regulated_steps: int
    mean_proximal: float
    max_proximal: float
    mean_score: float
    def __init__(self, modality: _Optional[str] = ..., fisher_trace: _Optional[float] = ..., window: _Optional[_Union[ModalityWindow, _Mapping]] = ..., regulated_steps: _Optional[int] = ..., mean_proximal: _Optional[float] = ..., max_proximal: _Optional[float] = ..., mean_score: _Optional[float] = ...) -> None: ...

class EpochRecord(_message.Message):
    __slots__ = ("epoch", "closed", "steps", "fallback_steps", "modalities", "restored")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    closed: bool
    steps: int
    fallback_steps: int
    modalities: _containers.RepeatedCompositeFieldContainer[ModalityEpoch]
    restored: bool
    def __init__(self, epoch: _Optional[int] = ..., closed: bool = ..., steps: _Optional[int] = ..., fallback_steps: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[ModalityEpoch, _Mapping]]] = ..., restored: bool = ...) -> None: ...

class EndEpochResponse(_message.Message):
    __slots__ = ("closed", "next_epoch", "next_window", "duplicate")
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    NEXT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    closed: EpochRecord
    next_epoch: int
    next_window: _containers.RepeatedCompositeFieldContainer[ModalityWindow]
    duplicate: bool
    def __init__(self, closed: _Optional[_Union[EpochRecord, _Mapping]] = ..., next_epoch: _Optional[int] = ..., next_window: _Optional[_Iterable[_Union[ModalityWindow, _Mapping]]] = ..., duplicate: bool = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "include_steps", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    include_steps: bool
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., include_steps: bool = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session", "epochs", "steps", "next_page_token", "steps_pruned_unix_ms")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_PRUNED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    epochs: _containers.RepeatedCompositeFieldContainer[EpochRecord]
    steps: _containers.RepeatedCompositeFieldContainer[StepRecord]
    next_page_token: str
    steps_pruned_unix_ms: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., epochs: _Optional[_Iterable[_Union[EpochRecord, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., steps_pruned_unix_ms: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("include_inactive", "limit")
    INCLUDE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    include_inactive: bool
    limit: int
    def __init__(self, include_inactive: bool = ..., limit: _Optional[int] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...
