"""OpenAI-provider models end to end: the real `openai` SDK against a scripted
OpenAI-compatible server on loopback (`tests.serving.fake_openai`), every job posted to the
running platform and followed to its end: usage, price, errors, progress, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from aigen.config import Settings
from aigen.serving.base import Usage
from aigen.serving.spec import ModelSpec
from tests.fixtures.platform import Platform
from tests.serving import fake_openai
from tests.serving.loopback import serve
from tests.serving.models_platform import models_platform

CREDITS = 1000


@pytest.fixture
def upstream() -> Starlette:
    return fake_openai.create_app()


@pytest.fixture
def specs() -> list[ModelSpec]:
    common = {"model": "up-model", "api_key_env": "TEST_UPSTREAM_KEY"}
    return [
        ModelSpec(
            name="up-text",
            provider="openai",
            task="text",
            price_per_request=1,
            price_per_1k_input_tokens=7,
            price_per_1k_output_tokens=300,
            options=common,
        ),
        ModelSpec(
            name="up-text-unstreamed",
            provider="openai",
            task="text",
            price_per_1k_output_tokens=300,
            options=common | {"stream": False},
        ),
        ModelSpec(
            name="up-text-impatient",
            provider="openai",
            task="text",
            price_per_request=1,
            options=common | {"timeout": 0.2},
        ),
        ModelSpec(
            name="up-image",
            provider="openai",
            task="image",
            price_per_image=40,
            price_per_1k_input_tokens=10,
            options=common,
        ),
        ModelSpec(
            name="up-embed",
            provider="openai",
            task="embedding",
            price_per_request=1,
            price_per_1k_input_tokens=250,
            options=common,
        ),
    ]


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings of the platform that a test changes by parametrizing `overrides`."""
    return {}


@pytest.fixture
async def platform(
    settings: Settings,
    engine: object,
    upstream: Starlette,
    specs: list[ModelSpec],
    overrides: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Platform]:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-loopback")
    async with serve(upstream) as url:
        base_url = f"{url}/v1"
        specs = [replace(spec, options=spec.options | {"base_url": base_url}) for spec in specs]
        async with models_platform(settings, specs, **overrides) as running:
            yield running


async def _run(
    platform: Platform, client: httpx.AsyncClient, model: str, input: dict[str, Any]
) -> dict[str, Any]:
    """POST the job, wait for its end, and GET it."""
    answer = await client.post("/v1/generate", json={"model": model, "input": input})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    await platform.wait_status(job_id, {"completed", "failed", "canceled"})
    job: dict[str, Any] = (await client.get(f"/v1/generate/{job_id}")).json()
    return job


async def _balance(client: httpx.AsyncClient) -> int:
    balance: int = (await client.get("/v1/account")).json()["balance"]
    return balance


def _spec(platform: Platform, name: str) -> ModelSpec:
    return platform.deps.catalog.get(name)


class TestPricing:
    """`credits_charged` is the price table applied to the usage the job records."""

    @pytest.mark.parametrize(
        ("model", "input", "usage", "hold", "charged"),
        [
            # 5 words + 8 template tokens in, "echo: one … five" (6 words) out:
            # 1 + 13 × 7/1000 + 6 × 300/1000 = 2.891 → 3; the hold prices 20 tokens out.
            (
                "up-text",
                {"prompt": "one two three four five", "max_tokens": 20},
                Usage(input_tokens=13, output_tokens=6),
                8,
                3,
            ),
            # The same without streaming: usage from the answer instead of the last chunk.
            (
                "up-text-unstreamed",
                {"prompt": "one two three four five", "max_tokens": 4},
                Usage(input_tokens=13, output_tokens=4),
                2,
                2,
            ),
            # 3 images × 40, and 3 prompt tokens × 10/1000 rounded up with them: 121.
            (
                "up-image",
                {"prompt": "a red cat", "n": 3},
                Usage(input_tokens=3, images=3),
                121,
                121,
            ),
            # 1 + 5 tokens × 250/1000 = 2.25 → 3.
            ("up-embed", {"text": ["hello world", "a b c"]}, Usage(input_tokens=5), 21, 3),
        ],
    )
    async def test_charged_by_use(
        self,
        platform: Platform,
        model: str,
        input: dict[str, Any],
        usage: Usage,
        hold: int,
        charged: int,
    ) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, model, input)
            assert job["status"] == "completed", job["error"]
            assert job["usage"] == usage.as_dict()
            assert job["credits_reserved"] == hold == _spec(platform, model).worst_case(input)
            assert job["credits_charged"] == charged == _spec(platform, model).charge(usage)
            assert await _balance(client) == CREDITS - charged
            assets = [(await client.get(asset["url"])).content for asset in job["assets"]]
        if model.startswith("up-text"):
            words = f"echo: {input['prompt']}".split()[: input["max_tokens"]]
            assert assets == [" ".join(words).encode()]
        elif model == "up-image":
            assert assets == [fake_openai.PNG] * 3
        else:
            assert assets == [b'{"data": [[0.0, 0.5], [1.0, 0.5]], "model": "up-model"}']
        await platform.assert_books_balance(customer.account_id)

    @pytest.mark.parametrize(
        ("model", "input"),
        [
            ("up-text", {"prompt": "hi", "top_p": 0.5}),
            ("up-text", {"prompt": "hi", "max_tokens": 5000}),
            ("up-image", {"prompt": "hi", "n": 9}),
            ("up-image", {"prompt": "hi", "size": "7x7"}),
            ("up-embed", {"text": []}),
        ],
    )
    async def test_bad_input_is_refused_at_post(
        self, platform: Platform, upstream: Starlette, model: str, input: dict[str, Any]
    ) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            answer = await client.post("/v1/generate", json={"model": model, "input": input})
            assert answer.status_code == 422
            assert answer.json()["code"] == "invalid_input"
            assert await _balance(client) == CREDITS
        assert upstream.state.requests == []


class TestErrors:
    async def test_rate_limited_then_served_after_retry_after(
        self, platform: Platform, upstream: Starlette
    ) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, "up-text", {"prompt": "rate-limit-once"})
        assert job["status"] == "completed"
        first, second = upstream.state.requests
        # The backoff alone would be ~10 ms; the server asked for 1 s.
        assert second["at"] - first["at"] >= 1.0
        assert job["credits_charged"] == _spec(platform, "up-text").charge(Usage(**job["usage"]))
        await platform.assert_books_balance(customer.account_id)

    @pytest.mark.parametrize(
        ("model", "input", "code", "retryable", "tries"),
        [
            ("up-text", {"prompt": "boom"}, "provider_unavailable", True, 3),
            ("up-text-impatient", {"prompt": "slow"}, "provider_timeout", True, 3),
            ("up-text", {"prompt": "rate-limit"}, "provider_rate_limited", True, 3),
            ("up-text", {"prompt": "bad"}, "invalid_input", False, 1),
            ("up-image", {"prompt": "unsafe"}, "content_rejected", False, 1),
            ("up-embed", {"text": "unauthorized"}, "provider_misconfigured", False, 1),
            ("up-text", {"prompt": "stream-error"}, "provider_unavailable", True, 3),
        ],
    )
    async def test_failed_job(
        self,
        platform: Platform,
        upstream: Starlette,
        model: str,
        input: dict[str, Any],
        code: str,
        retryable: bool,
        tries: int,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        if input.get("prompt") == "rate-limit":
            # Its 7 s Retry-After is waited out in full; shorten the wait, not the rule.
            monkeypatch.setattr("aigen.workflow.handlers.MAX_RETRY_AFTER_SECONDS", 0.0)
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            job = await _run(platform, client, model, input)
            assert job["status"] == "failed"
            assert job["error"]["code"] == code
            assert job["error"]["retryable"] is retryable
            assert job["credits_charged"] == 0
            assert await _balance(client) == CREDITS  # the hold went back
        assert len(upstream.state.requests) == tries
        await platform.assert_books_balance(customer.account_id)

    @pytest.mark.parametrize(
        "overrides", [{"provider_timeout_seconds": 0.5, "provider_max_tries": 2}]
    )
    async def test_time_limit_cuts_a_trickling_stream(
        self, platform: Platform, upstream: Starlette
    ) -> None:
        # Each chunk comes well within the SDK's read timeout; the whole answer would take
        # 2 s, past the workflow's limit on the whole call.
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            input = {"prompt": "trickle", "max_tokens": 40}
            job = await _run(platform, client, "up-text", input)
        assert job["status"] == "failed"
        assert (job["error"]["code"], job["error"]["retryable"]) == ("provider_timeout", True)
        await _wait_for(lambda: upstream.state.dropped == ["trickle", "trickle"], timeout=2)
        assert upstream.state.finished == []
        await platform.assert_books_balance(customer.account_id)


class TestRunning:
    async def test_status_shows_tokens_so_far(self, platform: Platform) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            # 40 words, one every 50 ms: about 2 s of streaming.
            input = {"prompt": "trickle", "max_tokens": 40}
            answer = await client.post("/v1/generate", json={"model": "up-text", "input": input})
            status_url = answer.json()["urls"]["status"]
            seen: list[int] = []
            async with asyncio.timeout(10):
                while True:
                    status = (await client.get(status_url)).json()
                    if status["status"] != "processing" and seen:
                        break
                    if status["status"] == "processing" and status["progress"]:
                        seen.append(status["progress"]["output_tokens"])
                    await asyncio.sleep(0.05)
            assert status["status"] == "completed"
            assert status["progress"] is None
            assert seen[0] > 0
            assert seen == sorted(seen)
            assert len(set(seen)) > 1  # it moved while we watched
            assert max(seen) <= 40
            job = (await client.get(f"/v1/generate/{answer.json()['id']}")).json()
            assert job["usage"]["output_tokens"] == 40

    @pytest.mark.parametrize("model", ["up-text", "up-text-unstreamed"])
    async def test_cancel_interrupts_the_call(
        self, platform: Platform, upstream: Starlette, model: str
    ) -> None:
        customer = await platform.customer(credits=CREDITS)
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate", json={"model": model, "input": {"prompt": "hang"}}
            )
            job_id = answer.json()["id"]
            await _wait_for(lambda: len(upstream.state.requests) == 1)
            canceled_at = time.monotonic()
            canceled = await client.post(f"/v1/generate/{job_id}/cancel")
            assert canceled.json()["status"] == "canceled"
            # The worker notices within a poll (50 ms) and drops the connection.
            await _wait_for(lambda: upstream.state.dropped == ["hang"], timeout=2)
            assert time.monotonic() - canceled_at < 1.0
            await asyncio.sleep(0.2)
            job = (await client.get(f"/v1/generate/{job_id}")).json()
            assert job["status"] == "canceled"
            assert job["credits_charged"] == 0
            assert await _balance(client) == CREDITS
        assert upstream.state.finished == []
        assert len(upstream.state.requests) == 1  # not retried
        await platform.assert_books_balance(customer.account_id)


async def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
