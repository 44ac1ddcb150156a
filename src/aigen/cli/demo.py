"""`aigen demo`: one real job through every step of the sequence, printed as it happens.

It starts the platform embedded in a temporary folder (SQLite, the database queue, a
local assets folder, the local model), a webhook receiver on loopback, and then acts as
the developer's app: POST, poll, receive and verify the webhook, download the asset.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aigen import logs, runtime
from aigen.backend.account import service as account_service
from aigen.backend.billing import service as billing
from aigen.backend.key import service as key_service
from aigen.bootstrap import build_deps
from aigen.client import verify_webhook
from aigen.config import Environment, Settings
from aigen.db.migrate import upgrade
from aigen.db.session import unit_of_work

PROMPT = "The three primary colours are"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _say(step: str, text: str) -> None:
    typer.echo(f"[{step:>6}] {text}")


class _Receiver:
    """The developer app's webhook endpoint (a real HTTP server on loopback)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()

    async def endpoint(self, request: Request) -> Response:
        await self.received.put((await request.body(), dict(request.headers)))
        return Response(status_code=200)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hooks/aigen", self.endpoint, methods=["POST"])])


async def _serve(app: Any, port: int, stop: asyncio.Event) -> None:
    server = runtime.EmbeddedServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await stop.wait()
    server.should_exit = True
    await task


async def _demo(folder: Path, model: str, max_tokens: int) -> None:
    api_port, hook_port = _free_port(), _free_port()
    settings = Settings(
        environment=Environment.development,
        data_dir=folder,
        public_url=f"http://127.0.0.1:{api_port}",
        poll_interval_seconds=0.02,
    )
    deps = await build_deps(settings)
    await upgrade(deps.engine)
    async with unit_of_work(deps.sessionmaker) as session:
        account = await account_service.create(session, "demo", credits=1000)
        _, key = await key_service.create(session, account_id=account.id, secret=deps.secret)
    _say("setup", f"embedded platform in {folder} (SQLite, database queue, local folder)")
    _say("setup", f"account {account.id} with 1000 credits, API key {key[:13]}…")

    stop = asyncio.Event()
    ready = asyncio.Event()
    receiver = _Receiver()
    background = [
        asyncio.create_task(runtime.run_parts(deps, list(runtime.BACKGROUND), stop)),
        asyncio.create_task(
            runtime.serve_api(deps, stop, host="127.0.0.1", port=api_port, ready=ready)
        ),
        asyncio.create_task(_serve(receiver.app(), hook_port, stop)),
    ]
    await ready.wait()
    try:
        await _walk_through(settings, key, hook_port, model, max_tokens, receiver)
        async with deps.sessionmaker() as session:
            balance = await billing.balance(session, account.id)
            ledger = await billing.ledger_sum(session, account.id)
        _say("ledger", f"balance {balance} credits == ledger sum {ledger}: {balance == ledger}")
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await deps.aclose()


async def _walk_through(
    settings: Settings,
    key: str,
    hook_port: int,
    model: str,
    max_tokens: int,
    receiver: _Receiver,
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=settings.public_url, headers=headers) as client:
        body = {
            "model": model,
            "input": {"prompt": PROMPT, "max_tokens": max_tokens},
            "webhook_url": f"http://127.0.0.1:{hook_port}/hooks/aigen",
        }
        _say("1", f"POST /v1/generate {json.dumps(body)}")
        started = time.monotonic()
        answer = await client.post("/v1/generate", json=body)
        job = answer.json()
        if answer.status_code != 202:
            raise typer.BadParameter(f"expected 202, got {answer.status_code}: {job}")
        _say(
            "2-6",
            f"{answer.status_code} Accepted  id={job['id']} status={job['status']} "
            f"credits_reserved={job['credits_reserved']} Location={answer.headers['location']}",
        )
        secret = (await client.get("/v1/webhooks/default/secret")).json()["key"]
        seen = job["status"]
        while seen not in ("completed", "failed", "canceled", "expired"):
            await asyncio.sleep(0.1)
            status = (await client.get(f"/v1/generate/{job['id']}/status")).json()
            if status["status"] != seen:
                seen = status["status"]
                elapsed = time.monotonic() - started
                _say("7-12", f"status → {seen}  ({elapsed:.2f} s after the POST)")
        payload, hook_headers = await asyncio.wait_for(receiver.received.get(), timeout=60)
        verified = verify_webhook(payload, hook_headers, secret)
        _say(
            "13-16",
            f"webhook {verified['type']} received, webhook-id={hook_headers['webhook-id']}, "
            "signature verified with the standardwebhooks library",
        )
        final = (await client.get(f"/v1/generate/{job['id']}")).json()
        if final["status"] != "completed":
            raise typer.BadParameter(f"the job ended {final['status']}: {final.get('error')}")
        asset = final["assets"][0]
        content = (await client.get(asset["url"])).text
        _say(
            "9.4",
            f"asset {asset['content_type']} {asset['bytes']} bytes sha256={asset['sha256'][:12]}…",
        )
        _say("model", f"{PROMPT}{content}")
        _say(
            "bill",
            f"usage {final['usage']}  credits_charged={final['credits_charged']} "
            f"of {final['credits_reserved']} reserved",
        )


def demo(
    model: Annotated[str, typer.Option(help="a text model of the catalog")] = "gemma-3-270m",
    max_tokens: Annotated[int, typer.Option(min=1, max=512)] = 24,
) -> None:
    """Run one real local-model job through every step of the sequence, and show it."""
    # The demo prints the steps itself; the platform's own log shows warnings only.
    logs.configure(json=False, level="warning")
    with tempfile.TemporaryDirectory(prefix="aigen-demo-") as folder:
        asyncio.run(_demo(Path(folder), model, max_tokens))
    typer.echo("demo finished: every step of the sequence ran")
