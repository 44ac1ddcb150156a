"""Liveness, readiness (each dependency reachable) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.responses import Response

from aigen.gateway.deps import DepsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(deps: DepsDep) -> JSONResponse:
    """Whether the database, broker, storage and Redis (when configured) answer; 503 when
    one does not."""

    async def database() -> None:
        async with deps.sessionmaker() as session:
            await session.execute(text("SELECT 1"))

    checks: dict[str, Any] = {
        "database": database(),
        "broker": deps.broker.ping(),
        "storage": deps.store.ping(),
    }
    if deps.settings.redis_url:
        checks["redis"] = deps.limiter.ping()
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check, timeout=3)
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in results.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": results},
        status_code=200 if ready else 503,
        headers={} if ready else {"Retry-After": "5"},
    )


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
