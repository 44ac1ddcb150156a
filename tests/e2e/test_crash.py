"""A worker that dies between claim and completion loses nothing and charges nothing twice."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from aigen import runtime
from aigen.backend.job import service as job_service
from aigen.bus import outbox
from aigen.bus.database import DatabaseBroker
from aigen.bus.messages import AIGenerationJobCompleted, AssetRef
from aigen.bus.topology import WORKFLOW
from aigen.config import Settings
from aigen.db.session import unit_of_work
from aigen.models import Asset, CreditEntry
from tests.fixtures.platform import start_platform

GOOD = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}


async def test_dead_worker_job_completes_once_and_is_charged_once(
    settings: Settings, engine: object
) -> None:
    async for platform in start_platform(settings, parts=["relay", "backend", "notifier"]):
        customer = await platform.customer(credits=100)
        async with platform.client(customer) as client:
            job_id = (await client.post("/v1/generate", json=GOOD)).json()["id"]

            # The "dead" worker: it leased the message and claimed the job, then vanished
            # without acking or answering; its lease runs out (2 s in tests).
            broker = platform.deps.broker
            assert isinstance(broker, DatabaseBroker)
            async with asyncio.timeout(5):
                while not (leases := await broker._claim(WORKFLOW, 1)):
                    await asyncio.sleep(0.05)
            assert leases[0].body
            async with unit_of_work(platform.deps.sessionmaker) as session:
                claimed = await job_service.claim(session, job_id)
            assert claimed is not None
            assert claimed.attempt == 1

            # A healthy worker starts; it gets the message once the lease has expired.
            worker = asyncio.create_task(runtime.run_worker(platform.deps, platform.stop))
            job = await platform.wait_status(job_id, {"completed", "failed"}, timeout=20)
            assert job.status == "completed"
            assert job.attempt == 2

            # The dead worker's late result (attempt 1) arrives after all: refused as stale.
            async with unit_of_work(platform.deps.sessionmaker) as session:
                outbox.add(
                    session,
                    AIGenerationJobCompleted(
                        job_id=job_id,
                        account_id=customer.account_id,
                        attempt=1,
                        assets=[AssetRef("assets/x/y/0.txt", "text/plain", 1, "0" * 64)],
                        usage={"input_tokens": 1, "output_tokens": 500, "images": 0},
                    ),
                )
            await asyncio.sleep(1.0)
            final = (await client.get(f"/v1/generate/{job_id}")).json()
            assert final["status"] == "completed"
            assert len(final["assets"]) == 1
            assert final["assets"][0]["sha256"] != "0" * 64

            async with platform.deps.sessionmaker() as session:
                kinds = (
                    await session.scalars(
                        select(CreditEntry.kind).where(CreditEntry.job_id == job_id)
                    )
                ).all()
                assert sorted(kinds) == ["capture", "hold", "release"]
                assets = (await session.scalars(select(Asset).where(Asset.job_id == job_id))).all()
                assert len(assets) == 1
            await platform.assert_books_balance(customer.account_id)
            platform.stop.set()
            await worker
