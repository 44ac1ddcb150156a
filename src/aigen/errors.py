"""The one error tree of the platform; each error carries its HTTP status and problem code.

Services raise these; `gateway.exception_handlers` renders them as RFC 9457
`application/problem+json`. Adapters translate foreign errors into this tree at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Problem(BaseModel):
    """An RFC 9457 problem document, as every error answer carries it."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None
    retryable: bool | None = None


class AppError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal server error"
    retryable: ClassVar[bool | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.title
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.message)

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The `responses=` entry for an endpoint that may raise this error."""
        return {"model": Problem, "description": cls.title}


class BadRequest(AppError):
    status_code = 400
    code = "bad_request"
    title = "Malformed request"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"
    title = "Missing or unknown API key"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"
    title = "Not allowed"


class PaymentRequired(AppError):
    status_code = 402
    code = "insufficient_credits"
    title = "Not enough credits"


class NotFound(AppError):
    status_code = 404
    code = "not_found"
    title = "Not found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"
    title = "Request body too large"


class UnsupportedMediaType(AppError):
    status_code = 415
    code = "unsupported_media_type"
    title = "Content-Type must be application/json"


class Unprocessable(AppError):
    status_code = 422
    code = "validation_error"
    title = "The request is not valid"


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"
    title = "Too many requests"
    retryable = True


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"
    title = "A dependency is unavailable"
    retryable = True
