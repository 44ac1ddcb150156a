"""The whole sequence over real HTTP: POST → 202 → worker → storage → result → webhook."""

from __future__ import annotations

import asyncio
import json

from standardwebhooks.webhooks import Webhook

from aigen.config import Settings
from tests.fixtures.platform import Platform, start_platform


class TestHappyPath:
    async def test_job_completes_and_webhook_verifies(self, platform: Platform) -> None:
        customer = await platform.customer(credits=100)
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate",
                json={
                    "model": "scripted-text",
                    "input": {"prompt": "Four score", "max_tokens": 10},
                    "webhook_url": platform.receiver.url,
                    "metadata": {"order": "42"},
                },
            )
            assert answer.status_code == 202, answer.text
            job = answer.json()
            assert job["status"] == "pending"
            assert answer.headers["location"].endswith(f"/v1/generate/{job['id']}")
            assert answer.headers["retry-after"]
            assert job["urls"]["status"].endswith(f"/v1/generate/{job['id']}/status")
            reserved = job["credits_reserved"]
            assert reserved > 0

            [delivery] = await platform.receiver.wait_for(1)
            secret = (await client.get("/v1/webhooks/default/secret")).json()["key"]
            payload = Webhook(secret).verify(delivery.body, delivery.headers)
            assert payload["type"] == "ai_generation.job.completed"
            assert payload["data"]["id"] == job["id"]
            assert payload["data"]["status"] == "completed"
            assert len(delivery.body) < 20_000

            final = (await client.get(f"/v1/generate/{job['id']}")).json()
            assert final["status"] == "completed"
            assert final["metadata"] == {"order": "42"}
            assert final["started_at"]
            assert final["completed_at"]
            # 4 output tokens at 1000 per 1k = 4 credits, plus 1 per request.
            assert final["usage"]["output_tokens"] == 4
            assert final["credits_charged"] == 5
            [asset] = final["assets"]
            assert asset["content_type"].startswith("text/plain")
            download = await client.get(asset["url"])
            assert download.status_code == 200
            assert download.text == "four score and seven"
            assert asset["bytes"] == len(download.content)

            status = await client.get(f"/v1/generate/{job['id']}/status")
            assert status.json()["status"] == "completed"
            assert "etag" in status.headers
            again = await client.get(
                f"/v1/generate/{job['id']}/status",
                headers={"If-None-Match": status.headers["etag"]},
            )
            assert again.status_code == 304

            account = (await client.get("/v1/account")).json()
            assert account["balance"] == 100 - 5
        await platform.assert_books_balance(customer.account_id)

    async def test_retryable_provider_errors_are_retried(self, platform: Platform) -> None:
        customer = await platform.customer()
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate", json={"model": "scripted-flaky", "input": {"prompt": "x"}}
            )
            job_id = answer.json()["id"]
            job = await platform.wait_status(job_id, {"completed", "failed"})
            assert job.status == "completed"
        await platform.assert_books_balance(customer.account_id)

    async def test_image_job_stores_png(self, platform: Platform) -> None:
        customer = await platform.customer()
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate",
                json={"model": "scripted-image", "input": {"prompt": "a cat", "n": 2}},
            )
            assert answer.status_code == 202, answer.text
            assert answer.json()["credits_reserved"] == 10
            await platform.wait_status(answer.json()["id"], {"completed"})
            final = (await client.get(f"/v1/generate/{answer.json()['id']}")).json()
            assert [a["content_type"] for a in final["assets"]] == ["image/png", "image/png"]
            png = (await client.get(final["assets"][1]["url"])).content
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            assert final["credits_charged"] == 10
        await platform.assert_books_balance(customer.account_id)


class TestFailurePath:
    async def test_permanent_failure_releases_hold_and_notifies(self, platform: Platform) -> None:
        customer = await platform.customer(credits=50)
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate",
                json={
                    "model": "scripted-broken",
                    "input": {"prompt": "refused"},
                    "webhook_url": platform.receiver.url,
                },
            )
            job_id = answer.json()["id"]
            [delivery] = await platform.receiver.wait_for(1)
            payload = json.loads(delivery.body)
            assert payload["type"] == "ai_generation.job.failed"
            final = (await client.get(f"/v1/generate/{job_id}")).json()
            assert final["status"] == "failed"
            assert final["error"]["code"] == "content_rejected"
            assert final["error"]["retryable"] is False
            assert final["error"]["message"]
            assert final["credits_charged"] == 0
            assert (await client.get("/v1/account")).json()["balance"] == 50
        await platform.assert_books_balance(customer.account_id)


class TestCancel:
    async def test_cancel_pending_refunds_in_full(self, settings: Settings, engine: object) -> None:
        # No worker: the job stays pending until it is canceled.
        async for platform in start_platform(settings, parts=["relay", "backend", "notifier"]):
            customer = await platform.customer(credits=20)
            async with platform.client(customer) as client:
                answer = await client.post(
                    "/v1/generate",
                    json={
                        "model": "scripted-text",
                        "input": {"prompt": "x", "max_tokens": 5},
                        "webhook_url": platform.receiver.url,
                    },
                )
                job_id = answer.json()["id"]
                assert (await client.get("/v1/account")).json()["balance"] < 20
                canceled = await client.post(f"/v1/generate/{job_id}/cancel")
                assert canceled.status_code == 200
                assert canceled.json()["status"] == "canceled"
                assert (await client.get("/v1/account")).json()["balance"] == 20
                again = await client.post(f"/v1/generate/{job_id}/cancel")
                assert again.status_code == 409
                [delivery] = await platform.receiver.wait_for(1)
                assert json.loads(delivery.body)["type"] == "ai_generation.job.canceled"
            await platform.assert_books_balance(customer.account_id)

    async def test_cancel_processing_interrupts_and_refunds(self, platform: Platform) -> None:
        customer = await platform.customer(credits=20)
        async with platform.client(customer) as client:
            answer = await client.post(
                "/v1/generate", json={"model": "scripted-slow", "input": {"prompt": "x"}}
            )
            job_id = answer.json()["id"]
            await platform.wait_status(job_id, {"processing"})
            canceled = await client.post(f"/v1/generate/{job_id}/cancel")
            assert canceled.json()["status"] == "canceled"
            # Longer than the model takes: its result, had it arrived, must be thrown away.
            await asyncio.sleep(2.0)
            final = (await client.get(f"/v1/generate/{job_id}")).json()
            assert final["status"] == "canceled"
            assert final["assets"] == []
            assert (await client.get("/v1/account")).json()["balance"] == 20
        await platform.assert_books_balance(customer.account_id)
