"""A test double of an OpenAI-compatible server: a few endpoints with scripted answers.

The prompt (or the first text to embed) picks the behaviour:

- `rate-limit` → 429 with `retry-after: 7`; `rate-limit-once` → 429 with `retry-after: 1`
  the first time, then an echo;
- `boom` (500), `bad` (400), `unsafe` (400, content policy code), `unauthorized` (401);
- `filtered` → a content-filter stop; `slow` → answers after half a second;
- `hang` → never answers: waits for the client to hang up and records that in `dropped`;
- `trickle` → streams `max_tokens` words, one every 50 ms (and then records `finished`);
- `no-usage` → a stream without its usage chunk (as `llama_cpp.server` answers);
- `stream-error` → a stream that breaks off with an error event;
- `url` → images answered by URL; anything else is echoed as `echo: <prompt>`.

Chat completions stream when asked (`stream: true`), one word per chunk; usage counts
words, so a test can work out the price: prompt tokens are the words of every message plus
`TEMPLATE_TOKENS`, completion tokens the words answered. Every request body is kept in
`app.state.requests` with its arrival time (`at`, monotonic seconds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aigen.serving.scripted import tiny_png

PNG = tiny_png(2, 2, b"\x10\x20\x30")
TEMPLATE_TOKENS = 8
TRICKLE_SECONDS = 0.05
HANG_SECONDS = 30.0


def _error(status: int, message: str, code: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _scripted(request: Request, prompt: str) -> Response | None:
    seen = request.app.state.seen
    seen[prompt] += 1
    if prompt == "rate-limit":
        return _error(429, "slow down", "rate_limit_exceeded", **{"retry-after": "7"})
    if prompt == "rate-limit-once" and seen[prompt] == 1:
        return _error(429, "slow down", "rate_limit_exceeded", **{"retry-after": "1"})
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
    if prompt == "hang":
        return await _hang(request, prompt)
    return None


async def _hang(request: Request, prompt: str) -> Response:
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            request.app.state.dropped.append(prompt)
            break
        await asyncio.sleep(0.01)
    return _error(500, "hung")


async def _body(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = await request.json()
    request.app.state.requests.append(
        {"path": request.url.path, "headers": request.headers, "at": time.monotonic(), **body}
    )
    return body


def _words(text: str) -> int:
    return len(text.split())


async def chat(request: Request) -> Response:
    body = await _body(request)
    prompt = body["messages"][-1]["content"]
    # A streamed `hang` starts its answer before it hangs (see `_stream`).
    hangs_later = prompt == "hang" and body.get("stream")
    if not hangs_later and (answer := await _scripted(request, prompt)):
        return answer
    words = f"echo: {prompt}".split()[: body.get("max_tokens", 256)]
    if prompt == "trickle":
        words = [f"w{index}" for index in range(body["max_tokens"])]
    finish = "stop"
    if prompt == "filtered":
        words, finish = [], "content_filter"
    usage = {
        "prompt_tokens": sum(_words(m["content"]) for m in body["messages"]) + TEMPLATE_TOKENS,
        "completion_tokens": len(words),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if body.get("stream"):
        with_usage = (body.get("stream_options") or {}).get("include_usage", False)
        events = _stream(request, prompt, words, finish, usage if with_usage else None)
        return StreamingResponse(events, media_type="text/event-stream")
    message = {"role": "assistant", "content": " ".join(words)}
    return JSONResponse(
        _chunk(body, choices=[{"index": 0, "message": message, "finish_reason": finish}])
        | {"object": "chat.completion", "usage": usage}
    )


def _chunk(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0}
    return head | {"model": body.get("model", "m")} | fields


async def _stream(
    request: Request,
    prompt: str,
    words: list[str],
    finish: str,
    usage: dict[str, int] | None,
) -> AsyncIterator[str]:
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def delta(content: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": content, "finish_reason": finish_reason}
        return event(_chunk({}, choices=[choice]))

    state = request.app.state
    try:
        yield delta({"role": "assistant"})
        for index, word in enumerate(words):
            if prompt == "trickle":
                await asyncio.sleep(TRICKLE_SECONDS)
            yield delta({"content": word if index == 0 else f" {word}"})
            if prompt == "stream-error":
                yield event({"error": {"message": "the model crashed", "type": "server_error"}})
                return
        if prompt == "hang":
            await asyncio.sleep(HANG_SECONDS)
        yield delta({}, finish)
        if usage is not None and prompt != "no-usage":
            yield event(_chunk({}, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
        state.finished.append(prompt)
    except asyncio.CancelledError:
        # Starlette cancels the stream when the client hangs up.
        state.dropped.append(prompt)
        raise


async def images(request: Request) -> Response:
    body = await _body(request)
    if answer := await _scripted(request, body["prompt"]):
        return answer
    if body["prompt"] == "url":
        item = {"url": str(request.url_for("file"))}
    else:
        item = {"b64_json": base64.b64encode(PNG).decode()}
    tokens = _words(body["prompt"])
    return JSONResponse(
        {
            "created": 0,
            "data": [item] * body.get("n", 1),
            "usage": {"input_tokens": tokens, "output_tokens": 100, "total_tokens": tokens + 100},
        }
    )


async def file(request: Request) -> Response:
    return Response(PNG, media_type="image/png")


async def embeddings(request: Request) -> Response:
    body = await _body(request)
    texts = body["input"]
    if answer := await _scripted(request, texts[0]):
        return answer
    data = [
        {"object": "embedding", "index": index, "embedding": [float(index), 0.5]}
        for index in range(len(texts))
    ]
    tokens = sum(_words(text) for text in texts)
    return JSONResponse(
        {
            "object": "list",
            "model": body["model"],
            "data": data[::-1],  # servers may answer out of order; `index` says where
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def create_app() -> Starlette:
    """The fake server; its records are `state.requests`, `seen`, `dropped`, `finished`."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/files/cat.png", file, name="file"),
        ]
    )
    app.state.requests = []
    app.state.seen = Counter()
    app.state.dropped = []
    app.state.finished = []
    return app
