"""The model-serving port: a `Provider` turns a job's input into outputs and usage.

Errors, translated from each SDK at the provider's edge::

    ProviderError                  code, message, retryable
    ├── ProviderTimeout            retryable: the call ran past its time limit
    ├── RateLimitedByProvider      retryable: upstream said 429 (carries `retry_after`)
    ├── ProviderUnavailable        retryable: upstream 5xx or connection error
    ├── InvalidProviderInput       permanent: upstream refused the input (400)
    ├── ContentRejected            permanent: upstream refused the content (policy)
    ├── ProviderMisconfigured      permanent: bad key, unknown upstream model, missing extra
    └── BadProviderResponse        permanent: upstream answered something we cannot read

The workflow retries the retryable ones with backoff, a bounded number of times, and
fails the job at once on the permanent ones. Each class's `code` is what a failed job shows
as `error.code`; the set is closed (an upstream's own codes never leak through), so callers
can switch on it. `provider_error` is the permanent catch-all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

TASKS = ("text", "image", "embedding")


@dataclass(frozen=True, slots=True)
class Output:
    data: bytes
    content_type: str
    ext: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "images": self.images,
        }


@dataclass(frozen=True, slots=True)
class ProviderResult:
    outputs: list[Output]
    usage: Usage = field(default_factory=Usage)


# Called by a streaming provider with progress so far, e.g. {"output_tokens": 12}.
ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    job_id: str
    model: str
    task: str
    input: dict[str, Any]
    on_progress: ProgressCallback | None = None


class Provider(Protocol):
    """Runs one model for one job. Implementations must be safe to call concurrently."""

    async def run(self, request: ProviderRequest) -> ProviderResult:
        """Run the model; raise a `ProviderError` subclass on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections or model memory."""
        ...


class ProviderError(Exception):
    code: str = "provider_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ProviderTimeout(ProviderError):
    code = "provider_timeout"
    retryable = True


class RateLimitedByProvider(ProviderError):
    code = "provider_rate_limited"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    code = "provider_unavailable"
    retryable = True


class InvalidProviderInput(ProviderError):
    code = "invalid_input"
    retryable = False


class ContentRejected(ProviderError):
    code = "content_rejected"
    retryable = False


class ProviderMisconfigured(ProviderError):
    """The operator's setup is wrong (401/403/404 upstream, a missing package): retrying
    the same job cannot help, so it fails at once and is refunded."""

    code = "provider_misconfigured"
    retryable = False


class BadProviderResponse(ProviderError):
    code = "provider_bad_response"
    retryable = False


ERRORS_BY_CODE: dict[str, type[ProviderError]] = {
    error.code: error
    for error in (
        ProviderTimeout,
        RateLimitedByProvider,
        ProviderUnavailable,
        InvalidProviderInput,
        ContentRejected,
        ProviderMisconfigured,
        BadProviderResponse,
    )
}


def error_for_code(code: str, message: str) -> ProviderError:
    """The error of our tree for an error code; an unknown code is the permanent catch-all,
    `provider_error`, naming the code in its message (codes stay a closed, documented set)."""
    error = ERRORS_BY_CODE.get(code)
    return error(message) if error else ProviderError(f"{message} (upstream code {code!r})")
