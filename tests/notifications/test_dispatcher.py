"""The dispatcher against a real loopback receiver: signing, answers, retries, the log."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, WebhookDelivery, WebhookEndpoint
from aigen.notifications import service
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED
from aigen.notifications.signing import new_secret

from .factories import create_account, create_endpoint, create_job
from .helpers import build_payload, load_attempts, load_deliveries
from .receiver import Answer, WebhookReceiverDouble, closed_port

MakeDispatcher = Callable[..., Dispatcher]


@pytest.fixture
async def make_dispatcher(
    sessionmaker: Sessionmaker, settings: Settings
) -> AsyncIterator[MakeDispatcher]:
    made: list[Dispatcher] = []

    def make(settings: Settings = settings, **options: Any) -> Dispatcher:
        options.setdefault("payload_builder", build_payload)
        dispatcher = Dispatcher(sessionmaker, settings, **options)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.aclose()


async def job_to(
    sessionmaker: Sessionmaker, url: str, *, endpoint: dict[str, Any] | None = None
) -> tuple[Account, list[WebhookDelivery]]:
    """An account, a completed job whose webhook_url is `url`, and its deliveries."""
    async with unit_of_work(sessionmaker) as session:
        account = await create_account(session)
        if endpoint is not None:
            await create_endpoint(session, account, **endpoint)
        job = await create_job(session, account, webhook_url=url)
        deliveries = await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
    return account, deliveries


async def endpoint_of(sessionmaker: Sessionmaker, endpoint_id: str) -> WebhookEndpoint:
    async with sessionmaker() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        return endpoint


async def run_until_settled(dispatcher: Dispatcher, sessionmaker: Sessionmaker) -> None:
    for _ in range(500):
        await dispatcher.run_once()
        if all(d.status != "pending" for d in await load_deliveries(sessionmaker)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("deliveries still pending")


class TestSuccess:
    async def test_job_url_and_endpoint_signed_and_logged(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        endpoint_secret = new_secret()
        account, deliveries = await job_to(
            sessionmaker,
            receiver.url("/job"),
            endpoint={"url": receiver.url("/endpoint"), "secret": endpoint_secret},
        )
        assert await make_dispatcher().run_once() == 2

        (to_job,) = receiver.received("/job")
        (to_endpoint,) = receiver.received("/endpoint")
        payload = to_job.verify(account.webhook_secret)
        assert payload["type"] == JOB_COMPLETED
        assert payload["data"]["status"] == "completed"
        assert to_endpoint.verify(endpoint_secret) == payload | {
            "timestamp": to_endpoint.verify(endpoint_secret)["timestamp"]
        }
        assert to_job.headers["content-type"] == "application/json"
        assert to_job.body == json.dumps(payload, separators=(",", ":")).encode()
        assert {to_job.webhook_id, to_endpoint.webhook_id} == {d.id for d in deliveries}

        for delivery in await load_deliveries(sessionmaker):
            assert delivery.status == "delivered"
            assert delivery.delivered_at is not None
            assert delivery.leased_until is None
            (attempt,) = await load_attempts(sessionmaker, delivery.id)
            assert (attempt.status_code, attempt.response_body, attempt.error) == (200, "ok", None)
            assert attempt.latency_ms >= 0

    async def test_nothing_due(self, make_dispatcher: MakeDispatcher) -> None:
        assert await make_dispatcher().run_once() == 0


class TestRetries:
    async def test_schedule_spacing_and_stable_id(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.default = Answer(500, b"boom")
        account, (delivery,) = await job_to(sessionmaker, receiver.url())
        await run_until_settled(make_dispatcher(), sessionmaker)

        requests = receiver.received()
        assert len(requests) == len(settings.webhook_retry_schedule) == 4
        assert {r.webhook_id for r in requests} == {delivery.id}
        for request in requests:
            request.verify(account.webhook_secret)
        gaps = [b.at - a.at for a, b in itertools.pairwise(requests)]
        for gap, planned in zip(gaps, settings.webhook_retry_schedule[1:], strict=True):
            low = planned * (1 - settings.webhook_jitter) - 0.01
            assert low <= gap <= planned * (1 + settings.webhook_jitter) + 0.5

        (final,) = await load_deliveries(sessionmaker)
        assert (final.status, final.attempts, final.next_attempt_at) == ("failed", 4, None)
        attempts = await load_attempts(sessionmaker, delivery.id)
        assert [(a.status_code, a.response_body) for a in attempts] == [(500, "boom")] * 4

    async def test_recovers(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(500), Answer(503), Answer(200))
        await job_to(sessionmaker, receiver.url())
        await run_until_settled(make_dispatcher(), sessionmaker)
        (delivery,) = await load_deliveries(sessionmaker)
        assert (delivery.status, delivery.attempts) == ("delivered", 3)
        attempts = await load_attempts(sessionmaker, delivery.id)
        assert [a.status_code for a in attempts] == [500, 503, 200]

    async def test_redirect_is_a_failure_and_not_followed(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(301, headers={"location": receiver.url("/elsewhere")}))
        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        await make_dispatcher().run_once()
        assert receiver.received("/elsewhere") == []
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.status_code == 301
        assert attempt.error is not None
        assert "redirects are not followed" in attempt.error
        (after,) = await load_deliveries(sessionmaker)
        assert (after.status, after.attempts) == ("pending", 1)

    async def test_429_waits_for_retry_after_within_bounds(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(429, headers={"retry-after": "3600"}))
        await job_to(sessionmaker, receiver.url())
        before = utcnow()
        await make_dispatcher().run_once()
        (delivery,) = await load_deliveries(sessionmaker)
        assert delivery.next_attempt_at is not None
        wait = (delivery.next_attempt_at - before).total_seconds()
        floor = settings.webhook_min_delay_after_throttle_seconds  # 0.2 > 0.1 × 1.2
        assert 2 * floor - 0.01 <= wait <= 2 * floor + 1.0  # Retry-After capped at 2 × delay

    async def test_timeout(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        quick = settings.model_copy(update={"webhook_timeout_seconds": 0.3})
        receiver.script("/hook", Answer(200, delay=2.0))
        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        before = utcnow()
        await make_dispatcher(quick).run_once()
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.status_code is None
        assert attempt.error == "timed out after 0.3 s"
        assert 250 <= attempt.latency_ms < 1500
        (after,) = await load_deliveries(sessionmaker)
        assert after.status == "pending"
        assert after.next_attempt_at is not None
        floor = quick.webhook_min_delay_after_throttle_seconds
        assert (after.next_attempt_at - before).total_seconds() >= floor

    async def test_connection_refused(
        self, sessionmaker: Sessionmaker, make_dispatcher: MakeDispatcher
    ) -> None:
        _, (delivery,) = await job_to(sessionmaker, f"http://127.0.0.1:{closed_port()}/hook")
        await make_dispatcher().run_once()
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.status_code is None
        assert attempt.error is not None
        assert attempt.error.startswith("ConnectError")

    async def test_unsafe_url_refused_every_attempt(
        self, sessionmaker: Sessionmaker, make_dispatcher: MakeDispatcher
    ) -> None:
        _, (delivery,) = await job_to(sessionmaker, "http://169.254.169.254/latest/meta-data/")
        await run_until_settled(make_dispatcher(), sessionmaker)
        attempts = await load_attempts(sessionmaker, delivery.id)
        assert len(attempts) == 4
        assert all(a.error and "SSRF guard" in a.error for a in attempts)


class TestAnswers:
    async def test_huge_body_is_cut(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(200, body=b"x" * 5_000_000))
        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        await make_dispatcher().run_once()
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.status_code == 200
        assert attempt.response_body == "x" * 20 * 1024

    async def test_binary_body_is_stored_as_text(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(500, body=b"\x00\xff bad"))
        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        await make_dispatcher().run_once()
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.response_body == "\ufffd\ufffd bad"

    async def test_410_disables_the_endpoint(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/endpoint", Answer(410))
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            endpoint = await create_endpoint(session, account, url=receiver.url("/endpoint"))
            first = await create_job(session, account)
            second = await create_job(session, account)
            (gone,) = await service.enqueue(session, job=first, event_type=JOB_COMPLETED)
        await make_dispatcher().run_once()

        disabled = await endpoint_of(sessionmaker, endpoint.id)
        assert disabled.disabled_at is not None
        assert disabled.disabled_reason == "answered 410 Gone"
        (failed,) = await load_deliveries(sessionmaker)
        assert (failed.id, failed.status) == (gone.id, "failed")

        # A delivery made before the endpoint was disabled fails without an HTTP request.
        async with unit_of_work(sessionmaker) as session:
            job = await session.merge(second)
            rows = [
                WebhookDelivery(
                    id="msg_late",
                    account_id=account.id,
                    endpoint_id=endpoint.id,
                    job_id=job.id,
                    event_type=JOB_COMPLETED,
                    target=f"endpoint:{endpoint.id}",
                    url=endpoint.url,
                )
            ]
            session.add_all(rows)
        await make_dispatcher().run_once()
        assert len(receiver.requests) == 1
        (late,) = await load_attempts(sessionmaker, "msg_late")
        assert late.error is not None
        assert "disabled" in late.error

    async def test_endpoint_failing_too_long_is_disabled(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.default = Answer(500)
        since = utcnow() - timedelta(seconds=settings.webhook_disable_after_seconds + 60)
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            endpoint = await create_endpoint(
                session, account, url=receiver.url(), failing_since=since
            )
            job = await create_job(session, account)
            await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
        await make_dispatcher().run_once()
        after = await endpoint_of(sessionmaker, endpoint.id)
        assert after.disabled_at is not None
        assert after.disabled_reason is not None
        assert "failing since" in after.disabled_reason
        (delivery,) = await load_deliveries(sessionmaker)
        assert delivery.status == "failed"

    async def test_success_clears_failing_since(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        receiver.script("/hook", Answer(500))
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            endpoint = await create_endpoint(session, account, url=receiver.url())
            job = await create_job(session, account)
            await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
        dispatcher = make_dispatcher()
        await dispatcher.run_once()
        assert (await endpoint_of(sessionmaker, endpoint.id)).failing_since is not None
        await run_until_settled(dispatcher, sessionmaker)
        assert (await endpoint_of(sessionmaker, endpoint.id)).failing_since is None


class TestRotation:
    async def test_old_and_new_secret_verify_within_the_window(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        old, new, older, newer = new_secret(), new_secret(), new_secret(), new_secret()
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            await create_endpoint(
                session,
                account,
                url=receiver.url("/rotating"),
                secret=new,
                previous_secret=old,
                previous_secret_expires_at=utcnow() + timedelta(hours=24),
            )
            await create_endpoint(
                session,
                account,
                url=receiver.url("/rotated"),
                secret=newer,
                previous_secret=older,
                previous_secret_expires_at=utcnow() - timedelta(seconds=1),
            )
            job = await create_job(session, account)
            await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
        await make_dispatcher().run_once()

        (rotating,) = receiver.received("/rotating")
        assert len(rotating.headers["webhook-signature"].split(" ")) == 2
        assert rotating.verify(old) == rotating.verify(new)
        (rotated,) = receiver.received("/rotated")
        rotated.verify(newer)
        with pytest.raises(Exception, match="No matching signature"):
            rotated.verify(older)


class TestPayload:
    async def test_too_large_fails_without_a_request(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        async def huge(session: AsyncSession, delivery: WebhookDelivery) -> dict[str, Any]:
            return {"type": delivery.event_type, "timestamp": "now", "data": {"x": "y" * 30_000}}

        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        await make_dispatcher(payload_builder=huge).run_once()
        assert receiver.requests == []
        (after,) = await load_deliveries(sessionmaker)
        assert after.status == "failed"
        (attempt,) = await load_attempts(sessionmaker, delivery.id)
        assert attempt.error is not None
        assert "limit is 20480" in attempt.error

    async def test_builder_error_is_retried(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        calls = 0

        async def flaky(session: AsyncSession, delivery: WebhookDelivery) -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("storage down")
            return await build_payload(session, delivery)

        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        await run_until_settled(make_dispatcher(payload_builder=flaky), sessionmaker)
        attempts = await load_attempts(sessionmaker, delivery.id)
        assert [a.status_code for a in attempts] == [None, 200]
        assert attempts[0].error is not None
        assert "building the payload failed" in attempts[0].error
        assert "storage down" not in attempts[0].error


class TestRedeliver:
    async def test_same_webhook_id_again(
        self,
        sessionmaker: Sessionmaker,
        receiver: WebhookReceiverDouble,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        _, (delivery,) = await job_to(sessionmaker, receiver.url())
        dispatcher = make_dispatcher()
        await dispatcher.run_once()
        async with unit_of_work(sessionmaker) as session:
            await service.redeliver(session, delivery.id)
        assert await dispatcher.run_once() == 1
        assert [r.webhook_id for r in receiver.requests] == [delivery.id, delivery.id]
        (after,) = await load_deliveries(sessionmaker)
        assert (after.status, after.attempts) == ("delivered", 1)
