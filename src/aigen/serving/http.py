"""`HTTPProvider`: a model served by any HTTP endpoint, e.g. an n8n webhook workflow.

The job is POSTed as JSON `{job_id, model, task, input}` to the `url` option, with the
header `auth_header` set to the value of the variable `auth_env` when that is given.
The answer is JSON, one of::

    {"text": "..."}                                          → a text/plain asset
    {"assets": [{"content_type": "image/png", "base64": "..."} | {..., "url": "..."}],
     "usage": {"input_tokens": 0, "output_tokens": 0, "images": 0}}
    {"error": {"code": "content_rejected", "message": "..."}}   → that error of our tree

Without `usage`, an image job counts its image assets and nothing else is counted.
Upstream statuses map as for OpenAI (`serving.status`); redirects are not followed.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import os

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aigen.config import Settings

from .base import (
    BadProviderResponse,
    Output,
    ProviderMisconfigured,
    ProviderRequest,
    ProviderResult,
    ProviderTimeout,
    ProviderUnavailable,
    Usage,
    error_for_code,
)
from .options import HTTPOptions
from .spec import ModelSpec
from .status import error_for_status

DEFAULT_TIMEOUT = 300.0


class _Asset(BaseModel):
    content_type: str
    base64: str | None = None
    url: str | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. total_tokens

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    images: int = Field(default=0, ge=0)


class _Error(BaseModel):
    code: str = "provider_error"
    message: str = "the model server reported an error"


class _Answer(BaseModel):
    text: str | None = None
    assets: list[_Asset] = Field(default_factory=list)
    usage: _Usage | None = None
    error: _Error | None = None


class HTTPProvider:
    """POSTs each job to one URL and turns the JSON answer into outputs."""

    def __init__(self, spec: ModelSpec, *, timeout: float = DEFAULT_TIMEOUT):
        options = HTTPOptions.model_validate(spec.options)
        self.spec = spec
        self.url = options.url
        self.headers: dict[str, str] = {}
        if options.auth_env:
            secret = os.environ.get(options.auth_env)
            if not secret:
                raise ProviderMisconfigured(f"{options.auth_env} is not set")
            # Sent with the job only, never to the URLs an answer points at.
            self.headers[options.auth_header] = secret
        self.client = httpx.AsyncClient(timeout=options.timeout or timeout)

    async def run(self, request: ProviderRequest) -> ProviderResult:
        payload = {
            "job_id": request.job_id,
            "model": self.spec.name,
            "task": self.spec.task,
            "input": request.input,
        }
        post = self.client.build_request("POST", self.url, json=payload, headers=self.headers)
        response = await self._send(post)
        try:
            answer: _Answer | None = _Answer.model_validate_json(response.content)
        except ValidationError:
            answer = None
        error = answer.error if answer is not None else None
        if not response.is_success:
            raise error_for_status(
                response.status_code,
                error.message if error else response.text[:200],
                headers=response.headers,
                upstream_code=error.code if error else None,
            )
        if answer is None:
            raise BadProviderResponse("the answer is not the JSON expected")
        if error is not None:
            raise error_for_code(error.code, error.message)
        return await self._result(answer)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.client.send(request)
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"{request.url.host} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"cannot reach {request.url.host}: {exc}") from exc
        if response.is_redirect:
            raise ProviderMisconfigured(f"{request.url} redirects; give the final URL")
        return response

    async def _result(self, answer: _Answer) -> ProviderResult:
        outputs = []
        if answer.text is not None:
            outputs.append(Output(answer.text.encode(), "text/plain; charset=utf-8", "txt"))
        for asset in answer.assets:
            outputs.append(
                Output(await self._asset_bytes(asset), asset.content_type, _ext(asset.content_type))
            )
        if not outputs:
            raise BadProviderResponse("the answer has neither text nor assets")
        if answer.usage is not None:
            usage = Usage(**answer.usage.model_dump())
        else:
            images = sum(output.content_type.startswith("image/") for output in outputs)
            usage = Usage(images=images if self.spec.task == "image" else 0)
        return ProviderResult(outputs, usage)

    async def _asset_bytes(self, asset: _Asset) -> bytes:
        if asset.base64 is not None:
            try:
                return base64.b64decode(asset.base64, validate=True)
            except binascii.Error as exc:
                raise BadProviderResponse(f"bad base64 asset: {exc}") from exc
        if asset.url is None:
            raise BadProviderResponse("an asset has neither base64 nor url")
        response = await self._send(self.client.build_request("GET", asset.url))
        if not response.is_success:
            raise error_for_status(response.status_code, f"fetching {asset.url} failed")
        return response.content


def _ext(content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type.split(";")[0].strip())
    return extension.lstrip(".") if extension else "bin"


def create_provider(spec: ModelSpec, settings: Settings | None) -> HTTPProvider:
    """The catalog's factory: the timeout defaults to the settings'."""
    if settings is None:
        return HTTPProvider(spec)
    return HTTPProvider(spec, timeout=settings.provider_timeout_seconds)
