"""Every frame of the socket protocol, in and out (PROTOCOL.md §2-§4). Pure: no I/O."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
MAX_ECHO = 200

ErrorCode = Literal[
    "bad_request",
    "unknown_type",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
]

# Close codes (PROTOCOL.md §4).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_TOKEN_EXPIRED = 4401

GroupId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
JobId = Annotated[str, Field(min_length=1, max_length=64)]
Ref = Annotated[str, Field(max_length=64)]


class ProtocolError(Exception):
    """A request the server refuses; becomes an ``error`` frame (or an HTTP error)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        ref: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = clip(message)
        self.ref = ref
        self.retry_after_s = retry_after_s

    def frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            out["ref"] = self.ref
        if self.retry_after_s is not None:
            out["retry_after_s"] = round(self.retry_after_s, 3)
        return out


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """Never echo more than ``limit`` characters of anything a client sent."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Command(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    ref: Ref | None = None


class JoinCommand(_Command):
    type: Literal["join"]
    group: GroupId
    since: Annotated[int, Field(ge=0, le=2**62)] | None = None


class LeaveCommand(_Command):
    type: Literal["leave"]
    group: GroupId


class SortCommand(_Command):
    type: Literal["sort"]
    group: GroupId
    options: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class CancelCommand(_Command):
    type: Literal["cancel"]
    job: JobId


class JobGetCommand(_Command):
    type: Literal["job.get"]
    job: JobId


class PingCommand(_Command):
    type: Literal["ping"]


Command = Annotated[
    JoinCommand | LeaveCommand | SortCommand | CancelCommand | JobGetCommand | PingCommand,
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_TYPES = frozenset({"join", "leave", "sort", "cancel", "job.get", "ping"})


def describe(err: ValidationError) -> str:
    """'field 'group' is required' style text for the first problem, never echoing input."""
    first = err.errors(include_url=False, include_input=False, include_context=False)[0]
    field = ".".join(str(p) for p in first["loc"] if p not in COMMAND_TYPES)
    if first["type"] == "missing":
        return f"field '{field}' is required"
    return f"field '{field}': {first['msg']}" if field else first["msg"]


def parse_command(raw: bytes | str) -> Command:
    """Decode and validate one client frame; raise ProtocolError saying what is wrong."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", f"frame must be a JSON object, got {_kind(obj)}")
    ref = obj.get("ref")
    if "ref" in obj and not (isinstance(ref, str) and len(ref) <= 64):
        raise ProtocolError("bad_request", "field 'ref' must be a string of at most 64 characters")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "field 'type' is required and must be a string", ref=ref)
    if kind not in COMMAND_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type '{clip(kind, 64)}'", ref=ref)
    try:
        return COMMAND_ADAPTER.validate_python(obj)
    except ValidationError as err:
        raise ProtocolError("bad_request", describe(err), ref=ref) from None


def _kind(obj: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )


# ---- outbound frames: the hot path builds dicts and encodes them once; these models are the
# documented shape, exported as JSON Schema and used by the tests to check every frame sent.


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")


class Limits(BaseModel):
    max_message_bytes: int
    messages_per_second: float


class HelloEvent(_Event):
    type: Literal["hello"]
    user: str
    protocol: int
    heartbeat_s: float
    limits: Limits


class Progress(BaseModel):
    done: int
    total: int
    percent: float


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool


class Category(BaseModel):
    name: str
    songs: list[str]


class ResultStats(BaseModel):
    model_config = ConfigDict(extra="allow")
    songs: int
    analysed: int
    cached: int
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    duration_ms: int


class JobResult(BaseModel):
    categories: list[Category]
    order: list[str]
    stats: ResultStats


JobStatus = Literal["queued", "running", "retrying", "completed", "failed", "cancelled"]


class Job(BaseModel):
    id: str
    group: str
    status: JobStatus
    stage: str | None
    progress: Progress
    attempt: int
    requested_by: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    result: JobResult | None


class Snapshot(BaseModel):
    job: Job | None
    online: list[str]
    playlist_version: int


class JoinedEvent(_Event):
    type: Literal["joined"]
    group: str
    seq: int
    recovered: bool
    snapshot: Snapshot


class LeftEvent(_Event):
    type: Literal["left"]
    group: str


class SortAcceptedEvent(_Event):
    type: Literal["sort.accepted"]
    job: Job
    deduplicated: bool


class CancelAcceptedEvent(_Event):
    type: Literal["cancel.accepted"]
    job: Job


class JobReplyEvent(_Event):
    type: Literal["job"]
    job: Job


class PongEvent(_Event):
    type: Literal["pong"]


class ErrorEvent(_Event):
    type: Literal["error"]
    code: ErrorCode
    message: str
    retry_after_s: float | None = None


class _Durable(_Event):
    group: str
    seq: int
    ts: str


class JobQueuedEvent(_Durable):
    type: Literal["job.queued"]
    job: Job


class JobStartedEvent(_Durable):
    type: Literal["job.started"]
    job: Job
    attempt: int


class JobProgressEvent(_Durable):
    type: Literal["job.progress"]
    job: str
    stage: Literal["metadata", "analysis", "saving"]
    done: int
    total: int
    percent: float
    message: str
    eta_s: float | None = None


class PartialSong(BaseModel):
    song: str
    category: str
    analysis: dict[str, Any]


class JobPartialEvent(_Durable):
    type: Literal["job.partial"]
    job: str
    songs: list[PartialSong]


class JobRetryingEvent(_Durable):
    type: Literal["job.retrying"]
    job: str
    attempt: int
    retry_in_s: float
    error: JobError


class JobCompletedEvent(_Durable):
    type: Literal["job.completed"]
    job: Job


class JobFailedEvent(_Durable):
    type: Literal["job.failed"]
    job: Job


class JobCancelledEvent(_Durable):
    type: Literal["job.cancelled"]
    job: Job
    by: str


class PlaylistUpdatedEvent(_Durable):
    type: Literal["playlist.updated"]
    version: int
    change: Literal["song_added", "song_removed", "sorted"]
    song: str | None = None
    songs: list[str] | None = None


class PresenceEvent(_Event):
    type: Literal["presence.joined", "presence.left"]
    group: str
    user: str


ServerFrame = Annotated[
    HelloEvent
    | JoinedEvent
    | LeftEvent
    | SortAcceptedEvent
    | CancelAcceptedEvent
    | JobReplyEvent
    | PongEvent
    | ErrorEvent
    | JobQueuedEvent
    | JobStartedEvent
    | JobProgressEvent
    | JobPartialEvent
    | JobRetryingEvent
    | JobCompletedEvent
    | JobFailedEvent
    | JobCancelledEvent
    | PlaylistUpdatedEvent
    | PresenceEvent,
    Field(discriminator="type"),
]
SERVER_FRAME_ADAPTER: TypeAdapter[ServerFrame] = TypeAdapter(ServerFrame)
DURABLE_TYPES = frozenset(
    {
        "job.queued",
        "job.started",
        "job.progress",
        "job.partial",
        "job.retrying",
        "job.completed",
        "job.failed",
        "job.cancelled",
        "playlist.updated",
    }
)
