"""The HTTP edge (seed steps 1–6 and 17): `create_app()` wires middleware, errors, routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aigen import __version__
from aigen.bootstrap import Deps, build_deps
from aigen.config import Settings

from . import exception_handlers
from .middleware import RequestContextMiddleware
from .routes import account, assets, catalog, health, jobs, webhooks
from .state import AppState, get_app_state

DESCRIPTION = """\
Asynchronous AI generation. `POST /v1/generate` accepts a job (`202`), a worker runs the
model, and the result arrives by signed webhook or by polling `GET /v1/generate/{id}`.
Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`. Errors are RFC 9457
`application/problem+json`.
"""


def create_app(settings: Settings, *, deps: Deps | None = None) -> FastAPI:
    """The API; with `deps` the caller owns the adapters (`aigen up`, tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = deps is None
        built = await build_deps(settings) if deps is None else deps
        app.state.aigen = AppState.create(built)
        stop = asyncio.Event()
        watcher = asyncio.create_task(listen(app, stop))
        try:
            yield
        finally:
            stop.set()
            await watcher
            if own:
                await built.aclose()

    app = FastAPI(
        title="aigen",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    if deps is not None:
        # Tests drive the app without running its lifespan (httpx's ASGITransport).
        app.state.aigen = AppState.create(deps)
    exception_handlers.install(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    for module in (jobs, catalog, account, assets, health):
        app.include_router(module.router)
    app.include_router(webhooks.router)
    return app


async def listen(app: FastAPI, stop: asyncio.Event) -> None:
    """Until `stop`: drop revoked keys from this process's key cache as their notices
    arrive, and hear which jobs ended (`Prefer: wait`)."""
    state = get_app_state(app)
    await asyncio.gather(
        state.deps.revocations.listen(state.key_cache.forget, stop), state.ended.run(stop)
    )
