"""What the API takes and answers for jobs (DESIGN §3); these become the OpenAPI schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

WebhookEvent = Literal[
    "ai_generation.job.completed", "ai_generation.job.failed", "ai_generation.job.canceled"
]
JobStatusName = Literal["pending", "processing", "completed", "failed", "canceled", "expired"]


class JobCreate(BaseModel):
    """A generation request; `input` is checked against the model's task."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100, examples=["gemma-3-270m"])
    input: dict[str, Any] = Field(examples=[{"prompt": "The capital of France is"}])
    webhook_url: AnyHttpUrl | None = Field(default=None, max_length=2048)
    webhook_events: list[WebhookEvent] | None = None
    metadata: dict[str, Any] | None = Field(
        default=None, description="Your own data, returned with the job (at most 16 keys)."
    )
    deadline_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = Field(
        default=None,
        description="If the job has not started this many seconds after acceptance, "
        "it expires and is refunded in full.",
    )


class AssetOut(BaseModel):
    url: str
    content_type: str
    bytes: int
    sha256: str
    url_expires_at: datetime


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool


class JobUrls(BaseModel):
    self: str
    status: str
    cancel: str


class JobOut(BaseModel):
    """A job as the API shows it; asset URLs are minted fresh on every read."""

    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatusName
    input: dict[str, Any]
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    attempt: int
    progress: dict[str, Any] | None = None
    queue_position: int | None = None
    assets: list[AssetOut] = Field(default_factory=list)
    error: JobError | None = None
    credits_reserved: int
    credits_charged: int | None = None
    usage: dict[str, int] | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    canceled_at: datetime | None = None
    expired_at: datetime | None = None
    deadline_at: datetime | None = None
    urls: JobUrls


class JobStatus(BaseModel):
    """The cheap polling answer."""

    id: str
    status: JobStatusName
    progress: dict[str, Any] | None = None
    queue_position: int | None = None
    updated_at: datetime


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = None
