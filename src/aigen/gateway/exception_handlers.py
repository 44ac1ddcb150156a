"""Every error leaves as an RFC 9457 problem; foreign errors are translated here."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from aigen.db.errors import UNAVAILABLE_SQLSTATES
from aigen.errors import AppError

from . import admission
from .problem import problem_response

log = structlog.get_logger(__name__)


def _request_id(request: Request) -> str | None:
    value = getattr(request.state, "request_id", None)
    return str(value) if value else None


def _with_limits(request: Request, headers: dict[str, str]) -> dict[str, str]:
    return {**admission.limit_headers(request.scope.get("state", {})), **headers}


async def app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    exc = await admission.count_late(request) or exc
    return problem_response(
        status=exc.status_code,
        code=exc.code,
        title=exc.title,
        detail=exc.message,
        request_id=_request_id(request),
        headers=_with_limits(request, exc.headers),
        retryable=exc.retryable,
        extra=exc.extra,
    )


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    refused = await admission.count_late(request)
    if refused is not None:
        return await app_error(request, refused)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return problem_response(
            status=400,
            code="malformed_json",
            title="Malformed JSON",
            detail="the request body is not valid JSON",
            request_id=_request_id(request),
            headers=_with_limits(request, {}),
        )
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    return problem_response(
        status=422,
        code="validation_error",
        title="The request is not valid",
        detail=f"{where}: {first['msg']}" if where else str(first["msg"]),
        request_id=_request_id(request),
        headers=_with_limits(request, {}),
        extra={"errors": errors},
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return problem_response(
        status=exc.status_code,
        code=codes.get(exc.status_code, "http_error"),
        title=str(exc.detail),
        detail=str(exc.detail),
        request_id=_request_id(request),
        headers=dict(exc.headers or {}),
    )


async def database_error(request: Request, exc: Exception) -> Response:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    lost = (
        isinstance(exc, OperationalError | InterfaceError | OSError)
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        # A server refusing work for now ("too many clients", shutting down): asyncpg's
        # errors reach us as a plain DBAPIError carrying the SQLSTATE.
        or (isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES))
    )
    if not lost:
        return await unexpected_error(request, exc)
    # A database that cannot be reached is a 503 the client may retry; the transaction
    # was rolled back, so nothing was half-written.
    log.warning("database.unavailable", error=repr(exc), request_id=_request_id(request))
    return problem_response(
        status=503,
        code="service_unavailable",
        title="A dependency is unavailable",
        detail="the database is not reachable; retry shortly",
        request_id=_request_id(request),
        headers={"Retry-After": "2"},
        retryable=True,
    )


async def pool_exhausted(request: Request, exc: Exception) -> Response:
    # Every database connection of this process stayed busy for the pool's whole timeout:
    # overload, not a bug; the client may retry, and nothing was written.
    log.warning("database.pool_exhausted", request_id=_request_id(request))
    return problem_response(
        status=503,
        code="service_unavailable",
        title="A dependency is unavailable",
        detail="the service is overloaded; retry shortly",
        request_id=_request_id(request),
        headers=_with_limits(request, {"Retry-After": "2"}),
        retryable=True,
    )


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("request.failed", request_id=_request_id(request), exc_info=exc)
    return problem_response(
        status=500,
        code="internal_error",
        title="Internal server error",
        detail="something went wrong on our side; the request changed nothing",
        request_id=_request_id(request),
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(OSError, database_error)
    app.add_exception_handler(PoolTimeoutError, pool_exhausted)
    app.add_exception_handler(Exception, unexpected_error)
