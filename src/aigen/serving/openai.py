"""`OpenAIProvider`: OpenAI, or any OpenAI-compatible server, through the official SDK.

`text` → chat completions → a `text/plain` asset; `image` → images (base64 answers, or URL
answers fetched with httpx) → PNG assets; `embedding` → embeddings → one JSON asset
`{"data": [[...], ...], "model": ...}`.

The SDK's own retries are off (`max_retries=0`): the workflow retries, with its backoff
and its bound, and SDK errors are translated here into the provider error tree.
"""

from __future__ import annotations

import base64
import json
import os

import httpx
import openai
from openai import AsyncOpenAI, omit
from openai.types.chat import ChatCompletionMessageParam

from aigen.config import Settings

from .base import (
    BadProviderResponse,
    ContentRejected,
    Output,
    ProviderError,
    ProviderMisconfigured,
    ProviderRequest,
    ProviderResult,
    ProviderTimeout,
    ProviderUnavailable,
    Usage,
)
from .inputs import EmbeddingInput, ImageInput, TextInput
from .options import OpenAIOptions
from .spec import ModelSpec
from .status import error_for_status

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT = 300.0
# What a server that wants no key (vLLM, Ollama, llama.cpp) is sent: the SDK needs one.
NO_KEY = "unused"


class OpenAIProvider:
    """One model of an OpenAI-compatible API; safe to call concurrently."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        """`api_key`, `base_url` and `timeout` are defaults the model's options override."""
        options = OpenAIOptions.model_validate(spec.options)
        self.spec = spec
        self.model = options.model or spec.name
        base_url = options.base_url or base_url
        if options.api_key_env:
            api_key = os.environ.get(options.api_key_env)
            if not api_key:
                raise ProviderMisconfigured(f"{options.api_key_env} is not set")
        api_key = api_key or os.environ.get(DEFAULT_KEY_ENV)
        if not api_key and base_url is None:
            raise ProviderMisconfigured(f"model {spec.name!r} needs {DEFAULT_KEY_ENV}")
        timeout = options.timeout or timeout
        self.client = AsyncOpenAI(
            api_key=api_key or NO_KEY, base_url=base_url, timeout=timeout, max_retries=0
        )
        self.http = httpx.AsyncClient(timeout=timeout)  # fetches images answered by URL

    async def run(self, request: ProviderRequest) -> ProviderResult:
        try:
            if self.spec.task == "text":
                return await self._text(TextInput.model_validate(request.input))
            if self.spec.task == "image":
                return await self._image(ImageInput.model_validate(request.input))
            return await self._embedding(EmbeddingInput.model_validate(request.input))
        except openai.OpenAIError as exc:
            raise translate(exc) from exc

    async def aclose(self) -> None:
        await self.client.close()
        await self.http.aclose()

    async def _text(self, input: TextInput) -> ProviderResult:
        messages: list[ChatCompletionMessageParam] = []
        if input.system:
            messages.append({"role": "system", "content": input.system})
        messages.append({"role": "user", "content": input.prompt})
        response = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=input.max_tokens,
            temperature=omit if input.temperature is None else input.temperature,
        )
        if not response.choices:
            raise BadProviderResponse("upstream answered no choice")
        choice = response.choices[0]
        if choice.finish_reason == "content_filter" or choice.message.refusal:
            raise ContentRejected(choice.message.refusal or "refused by the content filter")
        usage = Usage()
        if response.usage is not None:
            usage = Usage(
                input_tokens=response.usage.prompt_tokens,
                output_tokens=response.usage.completion_tokens,
            )
        text = choice.message.content or ""
        return ProviderResult([Output(text.encode(), "text/plain; charset=utf-8", "txt")], usage)

    async def _image(self, input: ImageInput) -> ProviderResult:
        response = await self.client.images.generate(
            model=self.model, prompt=input.prompt, n=input.n, size=input.size
        )
        outputs = [
            await self._image_bytes(image.b64_json, image.url) for image in response.data or []
        ]
        if not outputs:
            raise BadProviderResponse("upstream answered no image")
        tokens = response.usage.input_tokens if response.usage is not None else 0
        return ProviderResult(
            [image_output(data) for data in outputs],
            Usage(input_tokens=tokens, images=len(outputs)),
        )

    async def _image_bytes(self, b64_json: str | None, url: str | None) -> bytes:
        if b64_json:
            return base64.b64decode(b64_json)
        if not url:
            raise BadProviderResponse("upstream answered an image with neither data nor URL")
        try:
            response = await self.http.get(url)
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"fetching the image timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"fetching the image failed: {exc}") from exc
        if response.is_error:
            raise error_for_status(response.status_code, "fetching the image failed")
        return response.content

    async def _embedding(self, input: EmbeddingInput) -> ProviderResult:
        response = await self.client.embeddings.create(model=self.model, input=input.texts)
        vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
        body = json.dumps({"data": vectors, "model": response.model or self.model}).encode()
        usage = Usage(input_tokens=response.usage.prompt_tokens if response.usage else 0)
        return ProviderResult([Output(body, "application/json", "json")], usage)


def image_output(data: bytes) -> Output:
    """An image asset labelled by its bytes: PNG unless the upstream was told otherwise."""
    if data.startswith(b"\xff\xd8\xff"):
        return Output(data, "image/jpeg", "jpg")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return Output(data, "image/webp", "webp")
    return Output(data, "image/png", "png")


def translate(exc: openai.OpenAIError) -> ProviderError:
    """The provider error for an SDK error (`APITimeoutError` is an `APIConnectionError`)."""
    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeout(f"upstream timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable(f"cannot reach upstream: {exc}")
    if isinstance(exc, openai.APIStatusError):
        return error_for_status(
            exc.status_code, exc.message, headers=exc.response.headers, upstream_code=exc.code
        )
    # An answer the SDK could not read (APIResponseValidationError) or a client-side error.
    return BadProviderResponse(f"unexpected upstream answer: {exc}")


def create_provider(spec: ModelSpec, settings: Settings | None) -> OpenAIProvider:
    """The catalog's factory: key, base URL and timeout default to the settings'."""
    if settings is None:
        return OpenAIProvider(spec)
    return OpenAIProvider(
        spec,
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        timeout=settings.provider_timeout_seconds,
    )
