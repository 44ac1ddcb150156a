"""The events of the sequence (DESIGN §5) and their CloudEvents envelope.

`Envelope.id` is unique per event and is every consumer's deduplication key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from aigen.clock import utcnow
from aigen.ids import new_event_id

SOURCE = "aigen"

REQUESTED = "AIGenerationJobRequested"
COMPLETED = "AIGenerationJobCompleted"
FAILED = "AIGenerationJobFailed"
CANCELED = "AIGenerationJobCanceled"

ROUTING_KEYS = {
    REQUESTED: "ai.generation.job.requested",
    COMPLETED: "ai.generation.job.completed",
    FAILED: "ai.generation.job.failed",
    CANCELED: "ai.generation.job.canceled",
}


@dataclass(frozen=True, slots=True)
class AssetRef:
    key: str
    content_type: str
    bytes: int
    sha256: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class AIGenerationJobRequested:
    job_id: str
    account_id: str
    model: str
    input: dict[str, Any]
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class AIGenerationJobCompleted:
    job_id: str
    account_id: str
    attempt: int
    assets: list[AssetRef]
    usage: dict[str, int]
    status: str = "completed"


@dataclass(frozen=True, slots=True)
class AIGenerationJobFailed:
    job_id: str
    account_id: str
    attempt: int
    error: dict[str, Any]
    # `expired` when the deadline passed before the job started (DESIGN §4).
    status: str = "failed"


@dataclass(frozen=True, slots=True)
class AIGenerationJobCanceled:
    job_id: str
    account_id: str


Message = (
    AIGenerationJobRequested
    | AIGenerationJobCompleted
    | AIGenerationJobFailed
    | AIGenerationJobCanceled
)

_TYPES: dict[str, type[Any]] = {
    REQUESTED: AIGenerationJobRequested,
    COMPLETED: AIGenerationJobCompleted,
    FAILED: AIGenerationJobFailed,
    CANCELED: AIGenerationJobCanceled,
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A CloudEvents 1.0 structured-mode envelope around one message."""

    type: str
    data: dict[str, Any]
    # Time-ordered (`ids.new_event_id`): the inbox and outbox keys go in at their end.
    id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=utcnow)
    source: str = SOURCE
    # W3C `traceparent`, carried so one job can be followed from POST to webhook.
    traceparent: str | None = None

    @property
    def routing_key(self) -> str:
        return ROUTING_KEYS[self.type]

    @property
    def job_id(self) -> str:
        return str(self.data["job_id"])

    @classmethod
    def wrap(cls, message: Message, *, traceparent: str | None = None) -> Envelope:
        # Shallow: the fields are JSON-shaped already and never changed once sent, and
        # `asdict`'s deep copy of a job's input was 2–3 % of the accept path's CPU.
        data = {f.name: getattr(message, f.name) for f in fields(message)}
        if isinstance(message, AIGenerationJobCompleted):
            data["assets"] = [asdict(asset) for asset in message.assets]
        return cls(type=type(message).__name__, data=data, traceparent=traceparent)

    def message(self) -> Message:
        kind = _TYPES[self.type]
        data = dict(self.data)
        if kind is AIGenerationJobCompleted:
            data["assets"] = [AssetRef(**a) for a in data["assets"]]
        result: Message = kind(**data)
        return result

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "time": self.time.isoformat(),
            "datacontenttype": "application/json",
            "data": self.data,
        }
        if self.traceparent:
            body["traceparent"] = self.traceparent
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Envelope:
        body = json.loads(raw)
        return cls(
            type=body["type"],
            data=body["data"],
            id=body["id"],
            time=datetime.fromisoformat(body["time"]),
            source=body.get("source", SOURCE),
            traceparent=body.get("traceparent"),
        )
