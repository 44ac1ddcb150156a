"""A test double of an OpenAI-compatible server: a few endpoints with scripted answers.

The prompt picks the behaviour: `rate-limit` (429 with Retry-After), `boom` (500), `bad`
(400), `unsafe` (400 content policy), `unauthorized` (401), `filtered` (content filter
stop), `slow` (answers after half a second), `url` (images answered by URL); anything
else is echoed. Every request body is kept in `app.state.requests`.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aigen.serving.scripted import tiny_png

PNG = tiny_png(2, 2, b"\x10\x20\x30")


def _error(status: int, message: str, code: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _scripted(prompt: str) -> JSONResponse | None:
    if prompt == "rate-limit":
        return _error(429, "slow down", "rate_limit_exceeded", **{"retry-after": "7"})
    if prompt == "boom":
        return _error(500, "the server broke")
    if prompt == "bad":
        return _error(400, "max_tokens is too large")
    if prompt == "unsafe":
        return _error(400, "refused by safety system", "content_policy_violation")
    if prompt == "unauthorized":
        return _error(401, "incorrect API key")
    if prompt == "slow":
        await asyncio.sleep(0.5)
    return None


async def _body(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = await request.json()
    request.app.state.requests.append(
        {"path": request.url.path, "headers": request.headers, **body}
    )
    return body


async def chat(request: Request) -> Response:
    body = await _body(request)
    prompt = body["messages"][-1]["content"]
    if answer := await _scripted(prompt):
        return answer
    finish = "content_filter" if prompt == "filtered" else "stop"
    content = "" if prompt == "filtered" else f"echo: {prompt}"
    return JSONResponse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        }
    )


async def images(request: Request) -> Response:
    body = await _body(request)
    if answer := await _scripted(body["prompt"]):
        return answer
    if body["prompt"] == "url":
        item = {"url": str(request.url_for("file"))}
    else:
        item = {"b64_json": base64.b64encode(PNG).decode()}
    return JSONResponse(
        {
            "created": 0,
            "data": [item] * body.get("n", 1),
            "usage": {"input_tokens": 5, "output_tokens": 100, "total_tokens": 105},
        }
    )


async def file(request: Request) -> Response:
    return Response(PNG, media_type="image/png")


async def embeddings(request: Request) -> Response:
    body = await _body(request)
    texts = body["input"]
    if answer := await _scripted(texts[0]):
        return answer
    data = [
        {"object": "embedding", "index": index, "embedding": [float(index), 0.5]}
        for index in range(len(texts))
    ]
    return JSONResponse(
        {
            "object": "list",
            "model": body["model"],
            "data": data[::-1],  # servers may answer out of order; `index` says where
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/files/cat.png", file, name="file"),
        ]
    )
    app.state.requests = []
    return app
