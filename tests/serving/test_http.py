from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from aigen.serving.base import (
    BadProviderResponse,
    ContentRejected,
    InvalidProviderInput,
    ProviderMisconfigured,
    ProviderRequest,
    ProviderResult,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimitedByProvider,
    Usage,
)
from aigen.serving.catalog import Catalog
from aigen.serving.scripted import tiny_png
from aigen.serving.spec import ModelSpec

from .loopback import serve

PNG = tiny_png(3, 3, b"\x00\xff\x00")


async def _text(request: Request) -> Response:
    body = await request.json()
    request.app.state.received.append({"headers": request.headers, **body})
    return JSONResponse({"text": f"answer to {body['input']['prompt']}"})


async def _assets(request: Request) -> Response:
    return JSONResponse(
        {
            "assets": [
                {"content_type": "image/png", "base64": base64.b64encode(PNG).decode()},
                {"content_type": "image/png", "url": str(request.url_for("file"))},
            ],
            "usage": {"input_tokens": 2, "images": 2, "total_tokens": 2},
        }
    )


async def _file(request: Request) -> Response:
    # The auth header goes with the job only, never to the URLs the answer names.
    if "x-auth" in request.headers:
        return PlainTextResponse("leaked", status_code=400)
    return Response(PNG, media_type="image/png")


async def _slow(request: Request) -> Response:
    await asyncio.sleep(0.5)
    return JSONResponse({"text": "late"})


ANSWERS: dict[str, Response] = {
    "/no-usage": JSONResponse(
        {"assets": [{"content_type": "image/png", "base64": base64.b64encode(PNG).decode()}]}
    ),
    "/rate-limited": JSONResponse({}, status_code=429, headers={"retry-after": "3"}),
    "/broken": PlainTextResponse("upstream down", status_code=502),
    "/bad-input": JSONResponse(
        {"error": {"code": "invalid_input", "message": "prompt too long"}}, status_code=422
    ),
    "/refused": JSONResponse(
        {"error": {"code": "content_rejected", "message": "not allowed"}}, status_code=400
    ),
    "/refused-ok": JSONResponse({"error": {"code": "content_rejected", "message": "no"}}),
    "/not-json": PlainTextResponse("<html>hello</html>"),
    "/empty": JSONResponse({}),
    "/bad-base64": JSONResponse({"assets": [{"content_type": "image/png", "base64": "!!"}]}),
    "/redirect": RedirectResponse("/text", status_code=307),
    "/missing": PlainTextResponse("no such workflow", status_code=404),
}


def _scripted(path: str) -> Route:
    async def endpoint(request: Request) -> Response:
        return ANSWERS[path]

    return Route(path, endpoint, methods=["POST"])


@pytest.fixture
def app() -> Starlette:
    routes = [
        Route("/text", _text, methods=["POST"]),
        Route("/assets", _assets, methods=["POST"]),
        Route("/files/out.png", _file, name="file"),
        Route("/slow", _slow, methods=["POST"]),
        *(_scripted(path) for path in ANSWERS),
    ]
    app = Starlette(routes=routes)
    app.state.received = []
    return app


@pytest.fixture
async def base_url(app: Starlette) -> AsyncIterator[str]:
    async with serve(app) as url:
        yield url


async def _run(
    url: str, task: str = "text", input: dict[str, Any] | None = None, **options: Any
) -> ProviderResult:
    spec = ModelSpec(name="m", provider="http", task=task, options={"url": url, **options})  # type: ignore[arg-type]
    catalog = Catalog(specs=[spec])
    input = input or {"prompt": "hi"}
    try:
        return await catalog.provider("m").run(ProviderRequest("job-1", "m", task, input))
    finally:
        await catalog.aclose()


class TestAnswers:
    async def test_text(
        self, base_url: str, app: Starlette, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TEST_N8N_TOKEN", "Bearer abc")
        result = await _run(f"{base_url}/text", auth_env="TEST_N8N_TOKEN")
        assert result.outputs[0].data == b"answer to hi"
        assert result.outputs[0].ext == "txt"
        assert result.usage == Usage()
        [received] = app.state.received
        assert {key: received[key] for key in ("job_id", "model", "task", "input")} == {
            "job_id": "job-1",
            "model": "m",
            "task": "text",
            "input": {"prompt": "hi"},
        }
        assert received["headers"]["authorization"] == "Bearer abc"

    async def test_assets_by_base64_and_url(
        self, base_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TEST_N8N_TOKEN", "secret")
        result = await _run(
            f"{base_url}/assets",
            "image",
            {"prompt": "hi", "n": 2},
            auth_header="X-Auth",
            auth_env="TEST_N8N_TOKEN",
        )
        assert [(output.data, output.ext) for output in result.outputs] == [(PNG, "png")] * 2
        assert result.usage == Usage(input_tokens=2, images=2)

    async def test_images_counted_without_usage(self, base_url: str) -> None:
        result = await _run(f"{base_url}/no-usage", "image")
        assert result.usage == Usage(images=1)

    async def test_usage_clamped_by_the_catalog(self, base_url: str) -> None:
        # The server claims 2 images for a job that asked for 1.
        result = await _run(f"{base_url}/assets", "image")
        assert result.usage.images == 1


class TestErrors:
    @pytest.mark.parametrize(
        ("path", "error"),
        [
            ("/broken", ProviderUnavailable),
            ("/bad-input", InvalidProviderInput),
            ("/refused", ContentRejected),
            ("/refused-ok", ContentRejected),
            ("/not-json", BadProviderResponse),
            ("/empty", BadProviderResponse),
            ("/bad-base64", BadProviderResponse),
            ("/redirect", ProviderMisconfigured),
            ("/missing", ProviderMisconfigured),
        ],
    )
    async def test_mapped(self, base_url: str, path: str, error: type[Exception]) -> None:
        with pytest.raises(error):
            await _run(f"{base_url}{path}")

    async def test_rate_limited(self, base_url: str) -> None:
        with pytest.raises(RateLimitedByProvider) as caught:
            await _run(f"{base_url}/rate-limited")
        assert caught.value.retry_after == 3

    async def test_timeout(self, base_url: str) -> None:
        with pytest.raises(ProviderTimeout):
            await _run(f"{base_url}/slow", timeout=0.1)

    async def test_unreachable(self) -> None:
        with pytest.raises(ProviderUnavailable):
            await _run("http://127.0.0.1:9/")

    def test_missing_auth_variable(self) -> None:
        spec = ModelSpec(
            name="m",
            provider="http",
            task="text",
            options={"url": "http://127.0.0.1:9/", "auth_env": "TEST_UNSET_TOKEN"},
        )
        with pytest.raises(ProviderMisconfigured, match="TEST_UNSET_TOKEN"):
            Catalog(specs=[spec]).provider("m")
