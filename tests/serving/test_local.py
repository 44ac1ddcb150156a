"""The real CPU models of the `[local]` extra (CI installs it): a few tokens, a few texts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aigen.serving import local
from aigen.serving.base import ProviderRequest
from aigen.serving.catalog import Catalog
from aigen.serving.local import LocalEmbeddingProvider, LocalTextProvider
from aigen.serving.spec import ModelSpec
from tests.conftest import make_settings

pytestmark = pytest.mark.local_model


@pytest.fixture
async def text_model() -> AsyncIterator[LocalTextProvider]:
    provider = LocalTextProvider(ModelSpec(name="gemma-3-270m", provider="local", task="text"))
    yield provider
    await provider.aclose()


async def test_builtin_catalog_offers_them(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    catalog = Catalog(make_settings(tmp_path, local_models=True))
    assert catalog.get("gemma-3-270m").provider == "local"
    assert catalog.get("e5-small").task == "embedding"


async def test_text(text_model: LocalTextProvider) -> None:
    input = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    result = await text_model.run(ProviderRequest("job", "gemma-3-270m", "text", input))
    [output] = result.outputs
    assert output.content_type.startswith("text/plain")
    assert output.data.decode().strip()
    assert 1 <= result.usage.output_tokens <= 8
    assert result.usage.input_tokens >= 5


async def test_text_calls_run_one_at_a_time(text_model: LocalTextProvider) -> None:
    requests = [
        ProviderRequest("job", "m", "text", {"prompt": f"{n} + {n} =", "max_tokens": 4})
        for n in range(3)
    ]
    results = await asyncio.gather(*(text_model.run(request) for request in requests))
    assert all(1 <= result.usage.output_tokens <= 4 for result in results)


async def test_text_reports_progress(
    text_model: LocalTextProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "PROGRESS_SECONDS", 0.02)
    progress: list[int] = []

    async def on_progress(value: dict[str, Any]) -> None:
        progress.append(value["output_tokens"])

    input = {"prompt": "Once upon a time", "max_tokens": 16}
    await text_model.run(ProviderRequest("job", "m", "text", input, on_progress))
    assert progress
    assert progress == sorted(progress)
    assert 1 <= progress[-1] <= 16


async def test_text_cancel_releases_the_model(text_model: LocalTextProvider) -> None:
    long = {"prompt": "Once upon a time", "max_tokens": 512}
    task = asyncio.create_task(text_model.run(ProviderRequest("job", "m", "text", long)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    short = {"prompt": "Hello", "max_tokens": 2}
    result = await asyncio.wait_for(
        text_model.run(ProviderRequest("job", "m", "text", short)), timeout=30
    )
    assert result.usage.output_tokens <= 2


async def test_embedding() -> None:
    provider = LocalEmbeddingProvider(
        ModelSpec(name="e5-small", provider="local", task="embedding")
    )
    input = {"text": ["how much protein per day", "protein intake", "the weather in Paris"]}
    result = await provider.run(ProviderRequest("job", "e5-small", "embedding", input))
    await provider.aclose()
    body = json.loads(result.outputs[0].data)
    assert body["model"] == "e5-small"
    first, second, third = body["data"]
    assert len(first) == 384

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(first, first) == pytest.approx(1.0, abs=1e-3)
    assert dot(first, second) > dot(first, third)
    assert result.usage.input_tokens >= 9


class _FakeModel(local._LocalModel[object]):
    """The locking of the local providers, on a stand-in model that only sleeps."""

    loads = 0

    def _load(self) -> object:
        self.loads += 1
        return object()


async def test_one_call_at_a_time_even_when_a_caller_is_canceled() -> None:
    model = _FakeModel(ModelSpec(name="m", provider="local", task="text"))
    active = peak = 0

    def work(_: object) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        time.sleep(0.05)
        active -= 1

    async def call() -> None:
        await asyncio.shield(await model._start(work))

    tasks = [asyncio.create_task(call()) for _ in range(4)]
    await asyncio.sleep(0.01)
    tasks[0].cancel()  # its thread runs on; the next call must still wait for it
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (peak, model.loads) == (1, 1)
