"""Webhooks end to end: an endpoint made through the API hears a job's result, signed with
the secret the API showed once; the delivery log and the event feed tell the same story."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigen.client import verify_webhook
from aigen.config import Settings
from aigen.db.session import unit_of_work
from aigen.ids import new_id
from aigen.models import WebhookEndpoint
from aigen.notifications.signing import new_secret
from tests.conftest import make_settings
from tests.fixtures.platform import Platform, start_platform
from tests.notifications.api_helpers import settled_log


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url=database_url, events_feed_delay_seconds=0)


async def test_endpoint_delivery_log_and_event_feed(platform: Platform) -> None:
    customer = await platform.customer()
    receiver = platform.receiver
    async with platform.client(customer) as client:
        created = await client.post(
            "/v1/webhooks",
            json={"url": receiver.url, "events": ["ai_generation.job.completed"]},
        )
        assert created.status_code == 201, created.text
        endpoint = created.json()
        done = await client.post(
            "/v1/generate", json={"model": "scripted-text", "input": {"prompt": "hi"}}
        )
        broken = await client.post(
            "/v1/generate", json={"model": "scripted-broken", "input": {"prompt": "no"}}
        )
        job_id, broken_id = done.json()["id"], broken.json()["id"]

        (received,) = await receiver.wait_for(1)
        payload = verify_webhook(received.body, received.headers, endpoint["secret"])
        assert (payload["type"], payload["data"]["id"]) == ("ai_generation.job.completed", job_id)
        await platform.wait_status(broken_id, {"failed"})

        log = await settled_log(client, f"/v1/webhooks/{endpoint['id']}/deliveries")
        # The failure was not subscribed to: one message only.
        assert [(d["id"], d["job_id"], d["status"]) for d in log] == [
            (received.headers["webhook-id"], job_id, "delivered")
        ]
        assert [a["status_code"] for a in log[0]["attempts"]] == [200]

        # In the order the results happened, which the workers decide.
        events = {e["data"]["job_id"]: e for e in (await client.get("/v1/events")).json()["data"]}
        assert events.keys() == {job_id, broken_id}
        assert events[job_id]["type"] == "ai_generation.job.completed"
        assert events[broken_id]["type"] == "ai_generation.job.failed"
        assert events[broken_id]["data"]["error"]["code"] == "content_rejected"


async def test_notifier_takes_https_only_from_the_settings(
    settings: Settings, engine: object
) -> None:
    strict = settings.model_copy(update={"webhook_https_only": True})
    async for platform in start_platform(strict):
        customer = await platform.customer()
        # An endpoint registered before https-only was turned on: its URL is plain http.
        # (A job's own http URL is now refused when the job is posted.)
        async with unit_of_work(platform.deps.sessionmaker) as session:
            session.add(
                WebhookEndpoint(
                    id=new_id("ep"),
                    account_id=customer.account_id,
                    url=platform.receiver.url,
                    secret=new_secret(),
                )
            )
        async with platform.client(customer) as client:
            refused = await client.post(
                "/v1/generate",
                json={
                    "model": "scripted-text",
                    "input": {"prompt": "hi"},
                    "webhook_url": platform.receiver.url,
                },
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["code"] == "unsafe_webhook_url"
            # Delivered to the endpoint: refused by the guard at every attempt.
            answer = await client.post(
                "/v1/generate", json={"model": "scripted-text", "input": {"prompt": "hi"}}
            )
            job_id = answer.json()["id"]
            (delivery,) = await settled_log(
                client, f"/v1/webhook-deliveries?job_id={job_id}", within=30
            )
        assert delivery["status"] == "failed"
        assert len(delivery["attempts"]) == len(strict.webhook_retry_schedule)
        for attempt in delivery["attempts"]:
            assert "the URL scheme must be https" in attempt["error"]
        assert platform.receiver.received == []
