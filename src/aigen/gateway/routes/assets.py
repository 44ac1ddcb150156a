"""Downloads of local-folder assets by HMAC-signed, expiring URLs (DESIGN §8)."""

from __future__ import annotations

import mimetypes
import time
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from aigen.errors import Forbidden, NotFound
from aigen.gateway.deps import DepsDep
from aigen.storage.filesystem import verify_signed_url

router = APIRouter(prefix="/v1/assets", tags=["assets"])


class AssetLinkInvalidError(Forbidden):
    code = "asset_link_invalid"
    title = "The asset link is invalid or expired"


@router.get("/{key:path}", responses={403: Forbidden.schema(), 404: NotFound.schema()})
async def download(
    key: str,
    deps: DepsDep,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query()],
) -> Response:
    """The asset's bytes; the link itself is the credential, so no API key is needed."""
    if not verify_signed_url(key, expires, signature, secret=deps.secret, now=time.time()):
        raise AssetLinkInvalidError("this link is invalid or has expired; read the job again")
    try:
        data = await deps.store.get(key)
    except KeyError:
        raise NotFound("no such asset") from None
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(
        data,
        media_type=content_type,
        headers={"Cache-Control": f"private, max-age={max(0, expires - int(time.time()))}"},
    )
