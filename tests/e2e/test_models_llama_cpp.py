"""An OpenAI-compatible GPU-box stand-in end to end: `llama_cpp.server` serving the local
Gemma model on loopback, reached through the `openai` provider (the real SDK), with jobs
posted to the running platform. Kept quick: 8 tokens at temperature 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aigen.config import Settings
from aigen.serving.base import Usage
from aigen.serving.spec import ModelSpec
from tests.fixtures.platform import Platform
from tests.serving.llama_server import ALIAS, llama_server
from tests.serving.models_platform import models_platform

# Needs the `[local]` extra, server included, as `tests/serving/test_local.py` does.
pytestmark = pytest.mark.local_model

CREDITS = 1000
INPUT = {"prompt": "Write a poem about the sea.", "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_server(log) as url:
        yield url


@pytest.fixture
async def platform(settings: Settings, engine: object, server_url: str) -> AsyncIterator[Platform]:
    prices: dict[str, Any] = {
        "price_per_request": 1,
        "price_per_1k_input_tokens": 100,
        "price_per_1k_output_tokens": 500,
    }
    options = {"base_url": server_url, "model": ALIAS}  # no key: the server wants none
    specs = [
        ModelSpec(name="gemma-box", provider="openai", task="text", options=options, **prices),
        ModelSpec(
            name="gemma-box-unstreamed",
            provider="openai",
            task="text",
            options=options | {"stream": False},
            **prices,
        ),
    ]
    async with models_platform(settings, specs) as running:
        yield running


async def _complete(platform: Platform, model: str) -> dict[str, Any]:
    customer = await platform.customer(credits=CREDITS)
    async with platform.client(customer) as client:
        answer = await client.post("/v1/generate", json={"model": model, "input": INPUT})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        await platform.wait_status(job_id, {"completed", "failed"}, timeout=60)
        job: dict[str, Any] = (await client.get(f"/v1/generate/{job_id}")).json()
        assert job["status"] == "completed", job["error"]
        spec = platform.deps.catalog.get(model)
        assert job["credits_charged"] == spec.charge(Usage(**job["usage"]))
        assert job["credits_reserved"] == spec.worst_case(INPUT)
        balance = (await client.get("/v1/account")).json()["balance"]
        assert balance == CREDITS - job["credits_charged"]
        [asset] = job["assets"]
        job["text"] = (await client.get(asset["url"])).text
        assert len(job["text"].encode()) == asset["bytes"]
    await platform.assert_books_balance(customer.account_id)
    return job


class TestLlamaCppServer:
    async def test_job_charged_by_server_usage(self, platform: Platform) -> None:
        job = await _complete(platform, "gemma-box-unstreamed")
        usage = job["usage"]
        assert usage["input_tokens"] > 0
        assert 0 < usage["output_tokens"] <= INPUT["max_tokens"]
        assert job["text"].strip()

    async def test_streamed_job_counts_chunks(self, platform: Platform) -> None:
        # llama_cpp.server sends no usage in a stream: output tokens are the chunks counted,
        # one token each, so they match the server's own count of the same answer.
        streamed = await _complete(platform, "gemma-box")
        unstreamed = await _complete(platform, "gemma-box-unstreamed")
        assert streamed["text"] == unstreamed["text"]
        assert streamed["usage"] == {
            "input_tokens": 0,
            "output_tokens": unstreamed["usage"]["output_tokens"],
            "images": 0,
        }
