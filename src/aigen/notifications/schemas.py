"""What the webhooks API takes and answers (DESIGN §3, §7); these become the OpenAPI schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from aigen.backend.job.schemas import WebhookEvent


def _distinct(events: list[WebhookEvent] | None) -> list[WebhookEvent] | None:
    # An empty list subscribes to everything, as null does: store one spelling of it.
    if not events:
        return None
    return list(dict.fromkeys(events))


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


EventFilter = Annotated[
    list[WebhookEvent] | None,
    AfterValidator(_distinct),
    Field(
        description="The events to send; null or empty: every event.",
        examples=[["ai_generation.job.completed", "ai_generation.job.failed"]],
    ),
]
EndpointURL = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="Where to POST; checked by the SSRF guard when set and at every attempt.",
        examples=["https://example.com/hooks/aigen"],
    ),
]
Description = Annotated[str | None, Field(max_length=500)]
DeliveryStatus = Literal["pending", "delivered", "failed"]


class EndpointCreate(BaseModel):
    """A URL that receives the account's job events, signed with a secret of its own."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointURL
    events: EventFilter = None
    description: Description = None


class EndpointUpdate(BaseModel):
    """The fields to change; the ones left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointURL | None = None
    events: EventFilter = None
    description: Description = None

    @model_validator(mode="after")
    def _url_not_null(self) -> EndpointUpdate:
        if "url" in self.model_fields_set and self.url is None:
            raise ValueError("url may be changed but not removed")
        return self


class Endpoint(BaseModel):
    """A webhook endpoint; its secret is shown only on creation and rotation."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str] | None = Field(description="null: every event")
    description: str | None = None
    enabled: bool
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    failing_since: datetime | None = Field(
        default=None, description="Failing since then; disabled after 5 days of failures."
    )
    previous_secret_expires_at: datetime | None = Field(
        default=None, description="Until then the secret before the last rotation signs too."
    )
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(Endpoint):
    """The endpoint with its signing secret: shown once, keep it."""

    secret: str = Field(examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Endpoint]
    has_more: bool
    next_cursor: str | None = None


class Attempt(BaseModel):
    """One HTTP attempt of a delivery."""

    attempted_at: datetime
    status_code: int | None = Field(description="null when no answer came (see `error`)")
    latency_ms: int
    response_excerpt: str | None = Field(description="The answer's first 1 KiB.")
    response_body: str | None = Field(
        default=None,
        description="The answer as stored (up to 20 KB); only from "
        "`GET /v1/webhook-deliveries/{id}`.",
    )
    error: str | None = Field(description="Why the attempt failed when the status cannot say.")


class Delivery(BaseModel):
    """One message to one target; `id` is its `webhook-id` header on every attempt."""

    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str | None = Field(description="null for a job's own `webhook_url`")
    job_id: str
    event_type: str
    url: str
    status: DeliveryStatus
    next_attempt_at: datetime | None = Field(description="When the next attempt is due.")
    created_at: datetime
    delivered_at: datetime | None = None
    attempts: list[Attempt] = Field(description="Every attempt, oldest first.")


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]
    has_more: bool
    next_cursor: str | None = None


class RecoveryCreate(BaseModel):
    """Send again every failed message of the endpoint created in [since, until)."""

    model_config = ConfigDict(extra="forbid")

    since: datetime = Field(description="A time without an offset is read as UTC.")
    until: datetime | None = None

    @model_validator(mode="after")
    def _in_order(self) -> RecoveryCreate:
        if self.until is not None and _naive_utc(self.until) <= _naive_utc(self.since):
            raise ValueError("until must come after since")
        return self


class Recovery(BaseModel):
    object: Literal["webhook_recovery"] = "webhook_recovery"
    endpoint_id: str
    since: datetime
    until: datetime | None = None
    recovered: int = Field(description="How many failed messages are pending again.")


class Event(BaseModel):
    """A job result, as its webhook announced it (or would have)."""

    id: str = Field(description="Pass it as `after` to read the events that came later.")
    object: Literal["event"] = "event"
    type: WebhookEvent
    created_at: datetime
    data: dict[str, Any] = Field(
        examples=[{"job_id": "job_…", "status": "completed", "usage": {"output_tokens": 4}}]
    )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool
    next_cursor: str | None = Field(
        description="Pass it as `after` next time; null only when nothing has happened yet."
    )
