"""415 for a body that is not declared JSON, before FastAPI tries to parse it."""

from __future__ import annotations

from fastapi import Depends, Request

from aigen.errors import UnsupportedMediaType


async def _require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the body as application/json (got {media_type or 'no Content-Type'})"
        )


require_json = Depends(_require_json)
