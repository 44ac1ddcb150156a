"""Credits (DESIGN §6): hold the worst case, capture the actual, release the rest; never
charge a failed, canceled or expired job; never capture more than the hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from aigen.backend import sweeper
from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.bus.messages import AIGenerationJobCompleted
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import CreditEntry, Job, OutboxMessage
from tests.fixtures.platform import Api, Platform, start_platform

GOOD = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}


async def ledger(sessionmaker: Sessionmaker, job_id: str) -> dict[str, int]:
    async with sessionmaker() as session:
        rows = (
            await session.execute(
                select(CreditEntry.kind, CreditEntry.amount).where(CreditEntry.job_id == job_id)
            )
        ).all()
    return {kind: amount for kind, amount in rows}


class TestNeverCharged:
    async def test_failed_job(self, platform: Platform) -> None:
        customer = await platform.customer(credits=50)
        broken = {"model": "scripted-broken", "input": {"prompt": "x"}}
        async with platform.client(customer) as client:
            job_id = (await client.post("/v1/generate", json=broken)).json()["id"]
            job = await platform.wait_status(job_id, {"failed"})
        assert job.credits_charged == 0
        assert await ledger(platform.deps.sessionmaker, job_id) == {"hold": -3, "release": 3}
        await platform.assert_books_balance(customer.account_id)

    async def test_cancel_before_start_refunds_in_full(self, api: Api) -> None:
        customer = await api.customer(credits=50)
        async with api.client(customer) as client:
            job = (await client.post("/v1/generate", json=GOOD)).json()
            assert (await client.get("/v1/account")).json()["balance"] == 50 - 6
            canceled = (await client.post(f"/v1/generate/{job['id']}/cancel")).json()
            assert (await client.get("/v1/account")).json()["balance"] == 50
        assert canceled["status"] == "canceled"
        assert canceled["credits_charged"] == 0
        assert await ledger(api.deps.sessionmaker, job["id"]) == {"hold": -6, "release": 6}


class TestCapture:
    async def test_never_exceeds_the_hold(self, api: Api) -> None:
        job_id, account_id = await api.pending_job(credits=50, hold=6)
        async with unit_of_work(api.deps.sessionmaker) as session:
            assert await job_service.claim(session, job_id) is not None
        # A provider that reports far more than the input allowed is charged the hold only.
        async with unit_of_work(api.deps.sessionmaker) as session:
            done = await job_service.apply_completed(
                session,
                AIGenerationJobCompleted(
                    job_id=job_id,
                    account_id=account_id,
                    attempt=1,
                    assets=[],
                    usage={"input_tokens": 1, "output_tokens": 10_000, "images": 0},
                ),
                price=10_001,
            )
        assert done is not None
        assert done.credits_charged == 6
        assert await ledger(api.deps.sessionmaker, job_id) == {
            "hold": -6,
            "release": 6,
            "capture": -6,
        }
        async with api.deps.sessionmaker() as session:
            assert await billing.balance(session, account_id) == 44
            assert await billing.ledger_sum(session, account_id) == 44


class TestDeadline:
    @pytest.fixture
    async def no_worker(self, settings: Settings, engine: object) -> AsyncIterator[Platform]:
        quick = settings.model_copy(update={"sweep_interval_seconds": 0.1})
        async for running in start_platform(quick, parts=["relay", "backend", "notifier"]):
            yield running

    async def test_expires_and_refunds_with_no_worker(self, no_worker: Platform) -> None:
        customer = await no_worker.customer(credits=50, credits_per_day=6)
        body = {**GOOD, "deadline_s": 0.3, "webhook_url": no_worker.receiver.url}
        async with no_worker.client(customer) as client:
            job_id = (await client.post("/v1/generate", json=body)).json()["id"]
            job = await no_worker.wait_status(job_id, {"expired"}, timeout=10)
            assert job.credits_charged == 0
            assert job.error is not None
            assert job.error["code"] == "deadline_exceeded"
            [delivery] = await no_worker.receiver.wait_for(1)
            payload = json.loads(delivery.body)
            assert payload["data"]["status"] == "expired"
            assert payload["data"]["credits_reserved"] == 6
            assert payload["data"]["credits_charged"] == 0
            # The credits quota gets the hold back too (the backend refunds it).
            async with asyncio.timeout(10):
                while True:
                    account = (await client.get("/v1/account")).json()
                    if account["remaining"]["credits-per-day"]["remaining"] == 6:
                        break
                    await asyncio.sleep(0.05)
            assert account["balance"] == 50
        await no_worker.assert_books_balance(customer.account_id)

    async def test_sweep_expires_only_overdue_pending_jobs(self, api: Api) -> None:
        customer = await api.customer(credits=50)
        async with api.client(customer) as client:
            overdue = (await client.post("/v1/generate", json={**GOOD, "deadline_s": 0.01})).json()
            later = (await client.post("/v1/generate", json={**GOOD, "deadline_s": 3600})).json()
            none = (await client.post("/v1/generate", json=GOOD)).json()
        # The three answers can come within the 10 ms: the sweep must come after them.
        await asyncio.sleep(0.05)
        assert await sweeper.expire_overdue(api.deps.sessionmaker) == 1
        assert await sweeper.expire_overdue(api.deps.sessionmaker) == 0
        async with api.deps.sessionmaker() as session:
            statuses = {job.id: job.status for job in (await session.scalars(select(Job))).all()}
        assert statuses == {overdue["id"]: "expired", later["id"]: "pending", none["id"]: "pending"}
        assert await ledger(api.deps.sessionmaker, overdue["id"]) == {"hold": -6, "release": 6}


class TestLostJobs:
    async def test_a_processing_job_without_life_fails_refunded_and_announced(
        self, api: Api
    ) -> None:
        customer = await api.customer(credits=50)
        async with api.client(customer) as client:
            lost = (await client.post("/v1/generate", json=GOOD)).json()["id"]
            alive = (await client.post("/v1/generate", json=GOOD)).json()["id"]
        sessionmaker = api.deps.sessionmaker
        async with unit_of_work(sessionmaker) as session:
            for job_id in (lost, alive):
                assert await job_service.claim(session, job_id) is not None
            # The worker holding `lost` died an hour ago and its message is gone.
            job = await session.get(Job, lost)
            assert job is not None
            job.updated_at = job.updated_at - timedelta(hours=1)

        assert await sweeper.fail_lost(sessionmaker, older_than=600) == 1
        assert await sweeper.fail_lost(sessionmaker, older_than=600) == 0

        async with sessionmaker() as session:
            statuses = {
                j.id: (j.status, j.credits_charged) for j in await session.scalars(select(Job))
            }
            events = [
                json.loads(body)
                for body in await session.scalars(
                    select(OutboxMessage.body).where(OutboxMessage.type == "AIGenerationJobFailed")
                )
            ]
            assert await billing.balance(session, customer.account_id) == 50 - 6
            assert await billing.ledger_sum(session, customer.account_id) == 50 - 6
        assert statuses == {lost: ("failed", 0), alive: ("processing", None)}
        assert await ledger(sessionmaker, lost) == {"hold": -6, "release": 6}
        [event] = events
        assert event["data"]["job_id"] == lost
        assert event["data"]["error"]["code"] == "worker_lost"

    def test_a_job_is_lost_only_after_every_try_could_have_run(self) -> None:
        settings = Settings(
            provider_timeout_seconds=300, provider_max_tries=3, provider_retry_base_seconds=1
        )
        # Three tries at their limit, two pauses of up to 60 s (+20 % jitter), 2 min margin.
        assert settings.resolved_lost_after() == 900 + 2 * 72 + 120
        assert Settings(lost_after_seconds=30).resolved_lost_after() == 30


class TestWebhookCarriesCredits:
    async def test_completed_payload(self, platform: Platform) -> None:
        customer = await platform.customer(credits=50)
        async with platform.client(customer) as client:
            await client.post("/v1/generate", json={**GOOD, "webhook_url": platform.receiver.url})
            [delivery] = await platform.receiver.wait_for(1)
        data = json.loads(delivery.body)["data"]
        assert data["credits_reserved"] == 6
        assert data["credits_charged"] == 5
