"""`OpenAIProvider`: OpenAI, or any OpenAI-compatible server, through the official SDK.

`text` → chat completions → a `text/plain` asset; `image` → images (base64 answers, or URL
answers fetched with httpx) → PNG assets; `embedding` → embeddings → one JSON asset
`{"data": [[...], ...], "model": ...}`.

Text streams by default (`stream=True`, `stream_options.include_usage`), so the job shows
`{"output_tokens": n}` progress while the model writes, counted one per content chunk
(servers send about a token per chunk). Usage comes from the stream's final chunk; a
server that sends none is billed for the chunks counted as output tokens and nothing for
input (logged), unless the model's options say `stream = false`.

Cancelling the task that runs `run` (the workflow does, on a job cancel or its time
limit) closes the HTTP connection mid-call, so the upstream sees the client go.

The SDK's own retries are off (`max_retries=0`): the workflow retries, with its backoff
and its bound, and SDK errors are translated here into the provider error tree.
"""

from __future__ import annotations

import base64
import json
import os

import httpx
import openai
import structlog
from openai import AsyncOpenAI, omit
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.completion_usage import CompletionUsage

from aigen.config import Settings

from .base import (
    BadProviderResponse,
    ContentRejected,
    Output,
    ProgressCallback,
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
from .status import CONTENT_POLICY_CODES, error_for_status

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT = 300.0
# What a server that wants no key (vLLM, Ollama, llama.cpp) is sent: the SDK needs one.
NO_KEY = "unused"
TEXT = "text/plain; charset=utf-8"
logger = structlog.get_logger(__name__)


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
        self.stream = options.stream
        self._warned_no_usage = False
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
                return await self._text(request)
            if self.spec.task == "image":
                return await self._image(ImageInput.model_validate(request.input))
            return await self._embedding(EmbeddingInput.model_validate(request.input))
        except openai.OpenAIError as exc:
            raise translate(exc) from exc

    async def aclose(self) -> None:
        await self.client.close()
        await self.http.aclose()

    async def _text(self, request: ProviderRequest) -> ProviderResult:
        input = TextInput.model_validate(request.input)
        messages: list[ChatCompletionMessageParam] = []
        if input.system:
            messages.append({"role": "system", "content": input.system})
        messages.append({"role": "user", "content": input.prompt})
        if self.stream:
            return await self._stream_text(request, messages, input)
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
        text = choice.message.content or ""
        return ProviderResult([Output(text.encode(), TEXT, "txt")], _usage(response.usage))

    async def _stream_text(
        self,
        request: ProviderRequest,
        messages: list[ChatCompletionMessageParam],
        input: TextInput,
    ) -> ProviderResult:
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=input.max_tokens,
            temperature=omit if input.temperature is None else input.temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        answer = _StreamedAnswer(request.on_progress)
        async with stream:  # closes the connection however the loop ends, cancel included
            async for chunk in stream:
                await answer.add(chunk.choices, chunk.usage)
        if not answer.choices_seen:
            raise BadProviderResponse("upstream answered no choice")
        if answer.finish_reason == "content_filter" or answer.refusal:
            raise ContentRejected("".join(answer.refusal) or "refused by the content filter")
        if answer.usage is not None:
            usage = _usage(answer.usage)
        else:
            usage = Usage(output_tokens=answer.chunks)
            if not self._warned_no_usage:  # once: it is the server's way, not a job's fault
                self._warned_no_usage = True
                logger.warning(
                    "upstream streams no usage: output tokens counted from chunks, input "
                    "tokens not billed; set the model's option stream = false to bill both",
                    model=self.spec.name,
                )
        return ProviderResult([Output("".join(answer.text).encode(), TEXT, "txt")], usage)

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


class _StreamedAnswer:
    """The first choice of a streamed chat completion, gathered chunk by chunk."""

    def __init__(self, on_progress: ProgressCallback | None):
        self.on_progress = on_progress
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.chunks = 0
        self.choices_seen = False
        self.finish_reason: str | None = None
        self.usage: CompletionUsage | None = None

    async def add(self, choices: list[ChunkChoice], usage: CompletionUsage | None) -> None:
        self.usage = usage or self.usage  # the last chunk, after every choice has finished
        for choice in choices:
            if choice.index != 0:
                continue
            self.choices_seen = True
            self.finish_reason = choice.finish_reason or self.finish_reason
            if choice.delta.refusal:
                self.refusal.append(choice.delta.refusal)
            if choice.delta.content:
                self.text.append(choice.delta.content)
                self.chunks += 1
                if self.on_progress is not None:
                    await self.on_progress({"output_tokens": self.chunks})


def _usage(usage: CompletionUsage | None) -> Usage:
    if usage is None:
        return Usage()
    return Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


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
    if isinstance(exc, openai.APIResponseValidationError):
        return BadProviderResponse(f"unexpected upstream answer: {exc}")
    if isinstance(exc, openai.APIError):
        # An error event inside a stream: the answer had begun, so the request was fine.
        if exc.code in CONTENT_POLICY_CODES:
            return ContentRejected(f"upstream refused mid-answer: {exc.message}")
        return ProviderUnavailable(f"upstream failed mid-answer: {exc.message}")
    # A client-side error of the SDK.
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
