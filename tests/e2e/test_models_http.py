"""HTTP-provider models end to end: an n8n-style workflow server on loopback
(`tests.serving.fake_n8n`) is the engine of chosen models; jobs are posted to the running
platform and followed to their end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from aigen.config import Settings
from aigen.serving.base import Usage
from aigen.serving.spec import ModelSpec
from tests.fixtures.platform import Platform
from tests.serving import fake_n8n
from tests.serving.loopback import serve
from tests.serving.models_platform import models_platform

CREDITS = 1000
TOKEN = "n8n-secret"


@pytest.fixture
def n8n() -> Starlette:
    return fake_n8n.create_app(TOKEN)


def _spec(
    name: str, task: str, url: str, auth_env: str = "TEST_N8N_TOKEN", **fields: Any
) -> ModelSpec:
    options = {"url": url, "auth_header": fake_n8n.TOKEN_HEADER, "auth_env": auth_env}
    return ModelSpec(name=name, provider="http", task=task, options=options, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def platform(
    settings: Settings, engine: object, n8n: Starlette, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Platform]:
    monkeypatch.setenv("TEST_N8N_TOKEN", TOKEN)
    monkeypatch.setenv("TEST_WRONG_TOKEN", "guess")
    async with serve(n8n) as url:
        specs = [
            _spec(
                "n8n-writer",
                "text",
                f"{url}/webhook/write",
                price_per_request=2,
                price_per_1k_output_tokens=500,
            ),
            _spec("n8n-artist", "image", f"{url}/webhook/draw", price_per_image=15),
            _spec("n8n-prude", "text", f"{url}/webhook/refuse", price_per_request=1),
            _spec("n8n-stuck", "text", f"{url}/webhook/hang", price_per_request=1),
            _spec(
                "n8n-locked-out",
                "text",
                f"{url}/webhook/write",
                auth_env="TEST_WRONG_TOKEN",
                price_per_request=1,
            ),
        ]
        async with models_platform(settings, specs) as running:
            yield running


async def _run(
    platform: Platform, client: httpx.AsyncClient, model: str, input: dict[str, Any]
) -> dict[str, Any]:
    answer = await client.post("/v1/generate", json={"model": model, "input": input})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    await platform.wait_status(job_id, {"completed", "failed", "canceled"})
    job: dict[str, Any] = (await client.get(f"/v1/generate/{job_id}")).json()
    return job


class TestWorkflowEngine:
    async def test_text(self, platform: Platform, n8n: Starlette) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, "n8n-writer", {"prompt": "a haiku on rain"})
            assert job["status"] == "completed", job["error"]
            [asset] = job["assets"]
            assert (await client.get(asset["url"])).text == "n8n wrote: a haiku on rain"
            # "n8n wrote: a haiku on rain" is 6 words: 2 + 6 × 500/1000 = 5 credits.
            assert job["usage"] == Usage(input_tokens=4, output_tokens=6).as_dict()
            spec = platform.deps.catalog.get("n8n-writer")
            assert job["credits_charged"] == 5 == spec.charge(Usage(**job["usage"]))
            assert (await client.get("/v1/account")).json()["balance"] == CREDITS - 5
        [received] = n8n.state.received
        assert received == {
            "job_id": job["id"],
            "model": "n8n-writer",
            "task": "text",
            "input": {"prompt": "a haiku on rain", "max_tokens": 256},
        }
        await platform.assert_books_balance(customer.account_id)

    async def test_images_by_base64_and_url(self, platform: Platform) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, "n8n-artist", {"prompt": "a boat", "n": 3})
            assert job["status"] == "completed", job["error"]
            images = [(await client.get(asset["url"])).content for asset in job["assets"]]
            assert images == [fake_n8n.png(0), fake_n8n.png(1), fake_n8n.png(2)]
            assert [asset["content_type"] for asset in job["assets"]] == ["image/png"] * 3
            # No usage in the answer: the images are counted, 3 × 15.
            assert job["usage"] == Usage(images=3).as_dict()
            assert job["credits_charged"] == 45
        await platform.assert_books_balance(customer.account_id)

    @pytest.mark.parametrize(
        ("model", "code"),
        [("n8n-prude", "content_rejected"), ("n8n-locked-out", "provider_misconfigured")],
    )
    async def test_failed_at_once(
        self, platform: Platform, n8n: Starlette, model: str, code: str
    ) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, model, {"prompt": "x"})
            assert job["status"] == "failed"
            assert job["error"]["code"] == code
            assert job["error"]["retryable"] is False
            assert (await client.get("/v1/account")).json()["balance"] == CREDITS
        assert len(n8n.state.received) == (1 if model == "n8n-prude" else 0)
        await platform.assert_books_balance(customer.account_id)

    async def test_cancel_interrupts_the_call(self, platform: Platform, n8n: Starlette) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate", json={"model": "n8n-stuck", "input": {"prompt": "x"}}
            )
            job_id = answer.json()["id"]
            async with asyncio.timeout(5):
                while not n8n.state.received:
                    await asyncio.sleep(0.01)
            canceled_at = time.monotonic()
            assert (await client.post(f"/v1/generate/{job_id}/cancel")).status_code == 200
            async with asyncio.timeout(2):
                while not n8n.state.dropped:
                    await asyncio.sleep(0.01)
            assert time.monotonic() - canceled_at < 1.0
            assert n8n.state.dropped == [job_id]
            job = (await client.get(f"/v1/generate/{job_id}")).json()
            assert (job["status"], job["credits_charged"]) == ("canceled", 0)
        await platform.assert_books_balance(customer.account_id)
