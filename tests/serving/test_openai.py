from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette

from aigen.serving.base import (
    ContentRejected,
    InvalidProviderInput,
    ProviderMisconfigured,
    ProviderRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimitedByProvider,
    Usage,
)
from aigen.serving.catalog import Catalog
from aigen.serving.openai import OpenAIProvider, create_provider
from aigen.serving.spec import ModelSpec
from tests.conftest import make_settings

from .fake_openai import PNG, create_app
from .loopback import serve


@pytest.fixture
def app() -> Starlette:
    return create_app()


@pytest.fixture
async def base_url(app: Starlette) -> AsyncIterator[str]:
    async with serve(app) as url:
        yield f"{url}/v1"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-loopback")


def _catalog(base_url: str, task: str, **options: Any) -> Catalog:
    options = {
        "base_url": base_url,
        "model": "up-model",
        "api_key_env": "TEST_UPSTREAM_KEY",
    } | options
    spec = ModelSpec(name="m", provider="openai", task=task, options=options)  # type: ignore[arg-type]
    return Catalog(specs=[spec])


async def _run(catalog: Catalog, task: str, **input: Any) -> Any:
    try:
        return await catalog.provider("m").run(ProviderRequest("job", "m", task, input))
    finally:
        await catalog.aclose()


class TestText:
    async def test_streamed_chat_completion(self, base_url: str, app: Starlette) -> None:
        progress: list[dict[str, Any]] = []

        async def on_progress(update: dict[str, Any]) -> None:
            progress.append(update)

        catalog = _catalog(base_url, "text")
        input = {"prompt": "hello", "system": "be brief", "max_tokens": 5, "temperature": 0.3}
        try:
            result = await catalog.provider("m").run(
                ProviderRequest("job", "m", "text", input, on_progress=on_progress)
            )
        finally:
            await catalog.aclose()
        [output] = result.outputs
        assert output.data == b"echo: hello"
        assert output.content_type.startswith("text/plain")
        # The usage of the stream's last chunk: 3 words + 8 template tokens, 2 words out.
        assert result.usage == Usage(input_tokens=11, output_tokens=2)
        assert progress == [{"output_tokens": 1}, {"output_tokens": 2}]
        [sent] = app.state.requests
        assert sent["model"] == "up-model"
        assert sent["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ]
        assert (sent["max_tokens"], sent["temperature"]) == (5, 0.3)
        assert (sent["stream"], sent["stream_options"]) == (True, {"include_usage": True})
        assert sent["headers"]["authorization"] == "Bearer sk-loopback"

    async def test_unstreamed_chat_completion(self, base_url: str, app: Starlette) -> None:
        catalog = _catalog(base_url, "text", stream=False)
        result = await _run(catalog, "text", prompt="hello there", max_tokens=2)
        assert result.outputs[0].data == b"echo: hello"  # cut at max_tokens words
        assert result.usage == Usage(input_tokens=10, output_tokens=2)
        assert "stream" not in app.state.requests[0]

    async def test_stream_without_usage_counts_chunks(self, base_url: str) -> None:
        # llama_cpp.server ignores `stream_options`: output tokens are the chunks counted.
        result = await _run(_catalog(base_url, "text"), "text", prompt="no-usage")
        assert result.outputs[0].data == b"echo: no-usage"
        assert result.usage == Usage(output_tokens=2)

    async def test_temperature_left_to_the_server(self, base_url: str, app: Starlette) -> None:
        await _run(_catalog(base_url, "text"), "text", prompt="hello")
        assert "temperature" not in app.state.requests[0]

    @pytest.mark.parametrize("stream", [True, False])
    async def test_content_filter(self, base_url: str, stream: bool) -> None:
        with pytest.raises(ContentRejected):
            await _run(_catalog(base_url, "text", stream=stream), "text", prompt="filtered")

    async def test_error_mid_stream_is_retryable(self, base_url: str) -> None:
        with pytest.raises(ProviderUnavailable, match="the model crashed") as caught:
            await _run(_catalog(base_url, "text"), "text", prompt="stream-error")
        assert caught.value.retryable


class TestCancel:
    @pytest.mark.parametrize(
        ("task", "input", "options"),
        [
            ("text", {"prompt": "hang"}, {}),
            ("text", {"prompt": "hang"}, {"stream": False}),
            ("image", {"prompt": "hang"}, {}),
            ("embedding", {"text": "hang"}, {}),
        ],
    )
    async def test_cancel_drops_the_connection(
        self,
        base_url: str,
        app: Starlette,
        task: str,
        input: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        catalog = _catalog(base_url, task, **options)
        call = asyncio.create_task(_run(catalog, task, **input))
        async with asyncio.timeout(5):
            while not app.state.requests:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # into the wait, or for a stream, its first chunks
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            while not app.state.dropped:
                await asyncio.sleep(0.01)
        assert app.state.dropped == ["hang"]


class TestImage:
    async def test_base64(self, base_url: str) -> None:
        result = await _run(_catalog(base_url, "image"), "image", prompt="a cat", n=2)
        assert [output.data for output in result.outputs] == [PNG, PNG]
        assert {(output.content_type, output.ext) for output in result.outputs} == {
            ("image/png", "png")
        }
        assert result.usage == Usage(input_tokens=2, images=2)

    async def test_url_answers_are_fetched(self, base_url: str, app: Starlette) -> None:
        result = await _run(_catalog(base_url, "image"), "image", prompt="url", size="256x256")
        assert [output.data for output in result.outputs] == [PNG]
        assert app.state.requests[0]["size"] == "256x256"


class TestEmbedding:
    async def test_vectors_in_input_order(self, base_url: str) -> None:
        result = await _run(_catalog(base_url, "embedding"), "embedding", text=["a", "b", "c"])
        [output] = result.outputs
        assert output.content_type == "application/json"
        assert json.loads(output.data) == {
            "data": [[0.0, 0.5], [1.0, 0.5], [2.0, 0.5]],
            "model": "up-model",
        }
        assert result.usage == Usage(input_tokens=3)


class TestErrors:
    async def test_rate_limited(self, base_url: str) -> None:
        with pytest.raises(RateLimitedByProvider) as caught:
            await _run(_catalog(base_url, "text"), "text", prompt="rate-limit")
        assert caught.value.retryable
        assert caught.value.retry_after == 7

    async def test_server_error_is_not_retried_by_the_sdk(
        self, base_url: str, app: Starlette
    ) -> None:
        with pytest.raises(ProviderUnavailable) as caught:
            await _run(_catalog(base_url, "text"), "text", prompt="boom")
        assert caught.value.retryable
        assert len(app.state.requests) == 1  # max_retries=0: the workflow retries

    async def test_bad_request(self, base_url: str) -> None:
        with pytest.raises(InvalidProviderInput) as caught:
            await _run(_catalog(base_url, "text"), "text", prompt="bad")
        assert not caught.value.retryable
        assert "max_tokens is too large" in caught.value.message

    async def test_content_policy(self, base_url: str) -> None:
        with pytest.raises(ContentRejected):
            await _run(_catalog(base_url, "image"), "image", prompt="unsafe")

    async def test_unauthorized(self, base_url: str) -> None:
        with pytest.raises(ProviderMisconfigured):
            await _run(_catalog(base_url, "embedding"), "embedding", text="unauthorized")

    async def test_timeout(self, base_url: str) -> None:
        with pytest.raises(ProviderTimeout) as caught:
            await _run(_catalog(base_url, "text", timeout=0.1), "text", prompt="slow")
        assert caught.value.retryable

    async def test_connection_refused(self) -> None:
        with socket.socket() as sock:  # a port nobody listens on once closed
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(ProviderUnavailable):
            await _run(_catalog(f"http://127.0.0.1:{port}/v1", "text"), "text", prompt="x")


class TestConfiguration:
    def test_missing_key_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("TEST_UPSTREAM_KEY")
        catalog = _catalog("http://127.0.0.1:9/v1", "text")
        with pytest.raises(ProviderMisconfigured, match="TEST_UPSTREAM_KEY"):
            catalog.provider("m")

    def test_no_key_at_all_for_openai(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(ProviderMisconfigured, match="OPENAI_API_KEY"):
            OpenAIProvider(ModelSpec(name="gpt-4o-mini", provider="openai", task="text"))

    async def test_settings_give_defaults(self, tmp_path: Any) -> None:
        settings = make_settings(
            tmp_path,
            OPENAI_API_KEY="sk-settings",
            openai_base_url="http://127.0.0.1:9/v1",
            provider_timeout_seconds=12.0,
        )
        provider = create_provider(
            ModelSpec(name="gpt-4o-mini", provider="openai", task="text"), settings
        )
        assert provider.model == "gpt-4o-mini"
        assert provider.client.api_key == "sk-settings"
        assert str(provider.client.base_url) == "http://127.0.0.1:9/v1/"
        assert provider.client.timeout == 12.0
        assert provider.client.max_retries == 0
        await provider.aclose()
