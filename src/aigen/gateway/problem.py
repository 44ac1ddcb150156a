"""RFC 9457 problem answers: one shape for every error the API gives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

PROBLEM_TYPE_BASE = "https://aigen.dev/problems/"
MEDIA_TYPE = "application/problem+json"


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    request_id: str | None,
    headers: Mapping[str, str] | None = None,
    retryable: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    }
    if retryable is not None:
        body["retryable"] = retryable
    body.update(extra or {})
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type=MEDIA_TYPE
    )
