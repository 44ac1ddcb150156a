"""Receivers that fail in every way, and the delivery log as the API shows it.

Endpoints are made through the API; the dispatcher runs as `aigen notifier` runs it, on
the compressed schedule of the tests (0, 0.1, 0.2, 0.3 s, ±20 %); the number and spacing
of the attempts are read back from `GET /v1/webhooks/{id}/deliveries`. Every request that
arrives is verified with the `standardwebhooks` reference library.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import httpx
from prometheus_client import REGISTRY

from aigen.config import Settings
from tests.fixtures.platform import Api, Customer

from .api_helpers import completed_job, create_endpoint, notifier, settled_log
from .receiver import Answer, WebhookReceiverDouble, closed_port

SLACK = 0.5  # scheduling and loopback latency on a busy test machine


def gaps(delivery: dict[str, Any]) -> list[float]:
    """Seconds between the starts of consecutive attempts, as the log records them."""
    times = [datetime.fromisoformat(a["attempted_at"]) for a in delivery["attempts"]]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(times)]


def assert_on_schedule(delivery: dict[str, Any], settings: Settings, *, floor: float = 0) -> None:
    """Each retry waited its scheduled delay (± jitter), or at least `floor` seconds."""
    schedule, jitter = settings.webhook_retry_schedule, settings.webhook_jitter
    for index, gap in enumerate(gaps(delivery), start=1):
        low = max(schedule[index] * (1 - jitter), floor)
        high = max(schedule[index] * (1 + jitter), floor)
        latency = delivery["attempts"][index - 1]["latency_ms"] / 1000
        assert low - 0.01 <= gap <= latency + high + SLACK, (index, gap, low, high)


def assert_verified(receiver: WebhookReceiverDouble, path: str, secret: str, msg_id: str) -> None:
    for request in receiver.received(path):
        assert request.webhook_id == msg_id
        assert request.verify(secret)["type"] == "ai_generation.job.completed"


async def one_message(
    api: Api,
    client: httpx.AsyncClient,
    customer: Customer,
    url: str,
    *,
    settings: Settings | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An endpoint at `url`, one job result sent to it until settled: (endpoint, its log)."""
    endpoint = await create_endpoint(client, url)
    await completed_job(api, customer)
    async with notifier(api, settings):
        (delivery,) = await settled_log(client, f"/v1/webhooks/{endpoint['id']}/deliveries")
    return endpoint, delivery


class TestReceiverMatrix:
    async def test_500_then_200(
        self, api: Api, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/flaky", Answer(500, b"try later"), Answer(200, b"thanks"))
        before = REGISTRY.get_sample_value(
            "aigen_webhook_attempts_total", {"outcome": "retrying", "result": "5xx"}
        )
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/flaky"))
            metrics = (await client.get("/metrics")).text
        assert delivery["status"] == "delivered"
        assert delivery["delivered_at"] is not None
        assert delivery["next_attempt_at"] is None
        attempts = delivery["attempts"]
        assert [(a["status_code"], a["response_excerpt"]) for a in attempts] == [
            (500, "try later"),
            (200, "thanks"),
        ]
        assert all(a["latency_ms"] >= 0 and a["error"] is None for a in attempts)
        assert_on_schedule(delivery, settings)
        assert_verified(receiver, "/flaky", endpoint["secret"], delivery["id"])
        assert len(receiver.received("/flaky")) == 2
        after = REGISTRY.get_sample_value(
            "aigen_webhook_attempts_total", {"outcome": "retrying", "result": "5xx"}
        )
        assert (after or 0) - (before or 0) == 1
        assert 'aigen_webhook_attempts_total{outcome="delivered",result="2xx"}' in metrics

    async def test_timeouts(
        self, api: Api, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        quick = settings.model_copy(update={"webhook_timeout_seconds": 0.3})
        receiver.default = Answer(200, delay=1.0)
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(
                api, client, customer, receiver.url("/slow"), settings=quick
            )
        assert delivery["status"] == "failed"
        attempts = delivery["attempts"]
        assert len(attempts) == len(settings.webhook_retry_schedule) == 4
        for attempt in attempts:
            assert (attempt["status_code"], attempt["response_excerpt"]) == (None, None)
            assert attempt["error"] == "timed out after 0.3 s"
            assert 250 <= attempt["latency_ms"] < 300 + SLACK * 1000
        # A timeout waits at least the throttle floor (0.2 s here, 60 s in production).
        assert_on_schedule(delivery, quick, floor=quick.webhook_min_delay_after_throttle_seconds)
        assert len(receiver.received("/slow")) == 4
        assert_verified(receiver, "/slow", endpoint["secret"], delivery["id"])

    async def test_301_is_a_failure_and_not_followed(
        self, api: Api, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.default = Answer(301, b"moved", headers={"location": receiver.url("/new")})
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/old"))
        assert delivery["status"] == "failed"
        assert [a["status_code"] for a in delivery["attempts"]] == [301] * 4
        for attempt in delivery["attempts"]:
            assert (
                attempt["error"] == f"redirects are not followed (Location: {receiver.url('/new')})"
            )
        assert_on_schedule(delivery, settings)
        assert receiver.received("/new") == []
        assert_verified(receiver, "/old", endpoint["secret"], delivery["id"])

    async def test_410_disables_the_endpoint(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/gone", Answer(410, b"no such hook"))
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/gone"))
            path = f"/v1/webhooks/{endpoint['id']}"
            shown = (await client.get(path)).json()
            # No message is made for a disabled endpoint; recovery waits until it is enabled.
            await completed_job(api, customer)
            assert len((await client.get(f"{path}/deliveries")).json()["data"]) == 1
            since = {"since": endpoint["created_at"]}
            refused = await client.post(f"{path}/recover", json=since)
            assert (await client.post(f"{path}/enable")).json()["enabled"] is True
            recovered = (await client.post(f"{path}/recover", json=since)).json()
            async with notifier(api):
                (again,) = await settled_log(client, f"{path}/deliveries")
        assert delivery["status"] == "failed"
        assert [(a["status_code"], a["response_excerpt"]) for a in delivery["attempts"]] == [
            (410, "no such hook")
        ]
        assert (shown["enabled"], shown["disabled_reason"]) == (False, "answered 410 Gone")
        assert (refused.status_code, refused.json()["code"]) == (409, "webhook_endpoint_disabled")
        assert recovered["recovered"] == 1
        assert (again["id"], again["status"]) == (delivery["id"], "delivered")
        assert [a["status_code"] for a in again["attempts"]] == [410, 200]
        assert len(receiver.received("/gone")) == 2
        assert_verified(receiver, "/gone", endpoint["secret"], delivery["id"])

    async def test_429_honours_retry_after(
        self, api: Api, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/busy", Answer(429, headers={"retry-after": "1"}), Answer(200))
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/busy"))
        assert delivery["status"] == "delivered"
        assert [a["status_code"] for a in delivery["attempts"]] == [429, 200]
        # 0.1 s scheduled, raised to the 0.2 s floor after a 429; `Retry-After: 1` asks
        # for more, and is granted up to twice the delay: 0.4 s.
        (gap,) = gaps(delivery)
        floor = settings.webhook_min_delay_after_throttle_seconds
        assert 2 * floor - 0.01 <= gap <= 2 * floor + SLACK
        assert_verified(receiver, "/busy", endpoint["secret"], delivery["id"])

    async def test_slow_answer_within_the_timeout(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/patient", Answer(200, b"took a while", delay=0.6))
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/patient"))
        assert delivery["status"] == "delivered"
        (attempt,) = delivery["attempts"]
        assert attempt["status_code"] == 200
        assert attempt["latency_ms"] >= 600
        assert_verified(receiver, "/patient", endpoint["secret"], delivery["id"])

    async def test_huge_answer_is_cut(self, api: Api, receiver: WebhookReceiverDouble) -> None:
        receiver.script("/chatty", Answer(500, b"y" * 5_000_000), Answer(200))
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint, delivery = await one_message(api, client, customer, receiver.url("/chatty"))
            whole = (await client.get(f"/v1/webhook-deliveries/{delivery['id']}")).json()
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
        first = delivery["attempts"][0]
        assert first["response_excerpt"] == "y" * 1024
        assert first["response_body"] is None  # lists carry excerpts only
        assert whole["attempts"][0]["response_body"] == "y" * 20 * 1024
        assert whole["attempts"][0]["response_excerpt"] == "y" * 1024
        assert_verified(receiver, "/chatty", endpoint["secret"], delivery["id"])

    async def test_connection_refused(self, api: Api, settings: Settings) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            _, delivery = await one_message(
                api, client, customer, f"http://127.0.0.1:{closed_port()}/hook"
            )
        assert delivery["status"] == "failed"
        assert len(delivery["attempts"]) == 4
        for attempt in delivery["attempts"]:
            assert attempt["status_code"] is None
            assert attempt["error"].startswith("ConnectError")
        assert_on_schedule(delivery, settings)
