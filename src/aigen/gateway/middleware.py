"""Pure ASGI middleware at the edge: request ids, the body-size limit, rate-limit headers."""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import limit_headers
from .problem import problem_response

REQUEST_ID_HEADER = "x-request-id"


class RequestContextMiddleware:
    """Gives every request an id (kept from `X-Request-Id` when sane), echoes it on the
    answer with any rate-limit headers the auth step left in `scope["state"]`, and
    answers 413 when a body passes `max_body_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if 0 < len(given) <= 100 and given.isprintable() else _new_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send, request_id)
            return

        if scope["method"] in ("POST", "PUT", "PATCH"):
            # Read the body here (it is small by definition) so that an oversized one is
            # refused before any route runs, declared or not.
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body.extend(message.get("body", b""))
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await self._too_large(scope, receive, send, request_id)
                    return
            receive = _replay(bytes(body), receive)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["X-Request-Id"] = request_id
                for name, value in limit_headers(state).items():
                    if name not in out:
                        out[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        response = problem_response(
            status=413,
            code="payload_too_large",
            title="Request body too large",
            detail=f"the body may be at most {self.max_body_bytes} bytes",
            request_id=request_id,
            headers={"X-Request-Id": request_id},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _new_id() -> str:
    return "req_" + secrets.token_hex(12)
