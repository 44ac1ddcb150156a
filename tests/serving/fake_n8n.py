"""A test double of an n8n workflow served by its Webhook trigger node.

n8n answers a webhook with what its "Respond to Webhook" node is given, so a workflow made
for aigen's `http` provider takes the job JSON `{job_id, model, task, input}` and answers
JSON of that provider's contract. The path picks the workflow, as n8n's webhook paths do:

- `/webhook/write` → `{"text": ..., "usage": ...}`, a word count standing in for tokens;
- `/webhook/draw` → `n` PNG assets, alternately base64 and by URL (served by `/files/`);
- `/webhook/refuse` → a 200 answer carrying `{"error": {"code": "content_rejected"}}`;
- `/webhook/hang` → waits for the client to hang up and records that in `dropped`.

A request without `X-N8N-Token: <token>` gets n8n's 403. Jobs received are in `received`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aigen.serving.scripted import tiny_png

TOKEN_HEADER = "X-N8N-Token"
HANG_SECONDS = 30.0


def png(index: int) -> bytes:
    """The image a `draw` job's asset `index` is."""
    return tiny_png(4, 4, bytes([index * 40, 100, 200]))


async def webhook(request: Request) -> Response:
    state = request.app.state
    if request.headers.get(TOKEN_HEADER) != state.token:
        return JSONResponse({"message": "Authorization data is wrong!"}, status_code=403)
    job: dict[str, Any] = await request.json()
    state.received.append(job)
    workflow = request.path_params["workflow"]
    input = job["input"]
    if workflow == "write":
        text = f"n8n wrote: {input['prompt']}"
        usage = {"input_tokens": len(input["prompt"].split()), "output_tokens": len(text.split())}
        return JSONResponse({"text": text, "usage": usage})
    if workflow == "draw":
        assets = []
        for index in range(input.get("n", 1)):
            if index % 2:
                url = str(request.url_for("file", name=f"{index}.png"))
                assets.append({"content_type": "image/png", "url": url})
            else:
                data = base64.b64encode(png(index)).decode()
                assets.append({"content_type": "image/png", "base64": data})
        return JSONResponse({"assets": assets})
    if workflow == "refuse":
        return JSONResponse({"error": {"code": "content_rejected", "message": "not on brand"}})
    assert workflow == "hang"
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            state.dropped.append(job["job_id"])
            break
        await asyncio.sleep(0.01)
    return JSONResponse({"text": "too late"})


async def file(request: Request) -> Response:
    return Response(png(int(request.path_params["name"].split(".")[0])), media_type="image/png")


def create_app(token: str) -> Starlette:
    """The fake n8n; its records are `state.received` and `state.dropped`."""
    app = Starlette(
        routes=[
            Route("/webhook/{workflow}", webhook, methods=["POST"]),
            Route("/files/{name}", file, name="file"),
        ]
    )
    app.state.token = token
    app.state.received = []
    app.state.dropped = []
    return app
