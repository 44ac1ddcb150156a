"""`aigen notifier` as a real process: killed with SIGKILL mid-schedule, then started again.

The first process dies with retries pending and one attempt in flight (the receiver holds
that request open). The second carries on from the schedule in the database: every
message is delivered, and a message sent twice is sent with the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

import pytest

from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.notifications import service
from aigen.notifications.service import JOB_COMPLETED

from .factories import create_account, create_endpoint, create_job
from .helpers import eventually, load_attempts, load_deliveries, settled
from .receiver import Answer, WebhookReceiverDouble

pytestmark = pytest.mark.slow

PATHS = [f"/m{i}" for i in range(6)]
IN_FLIGHT = "/in-flight"


def notifier_env(settings: Settings) -> dict[str, str]:
    """The settings of the test, as the environment a deployed notifier reads."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AIGEN_")}
    return inherited | {
        "AIGEN_ENVIRONMENT": "test",
        "AIGEN_DATA_DIR": str(settings.data_dir),
        "AIGEN_DATABASE_URL": settings.database_url,
        "AIGEN_SECRET_KEY": settings.secret_key,
        "AIGEN_LOCAL_MODELS": "false",
        "AIGEN_LOG_JSON": "true",
        "AIGEN_POLL_INTERVAL_SECONDS": "0.02",
        "AIGEN_LEASE_SECONDS": "1",
        "AIGEN_WEBHOOK_TIMEOUT_SECONDS": "2",
        # Six attempts: a killed attempt uses one up.
        "AIGEN_WEBHOOK_RETRY_SCHEDULE": "0,0.3,0.3,0.3,0.3,0.3",
        "AIGEN_WEBHOOK_MIN_DELAY_AFTER_THROTTLE_SECONDS": "0.3",
        "AIGEN_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
    }


@pytest.fixture
async def processes(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[[], asyncio.Future[asyncio.subprocess.Process]]]:
    """Starts `python -m aigen notifier`; whatever is still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []
    logs: list[IO[bytes]] = []

    def start() -> asyncio.Future[asyncio.subprocess.Process]:
        log = (tmp_path / f"notifier-{len(logs)}.log").open("wb")
        logs.append(log)

        async def spawn() -> asyncio.subprocess.Process:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aigen",
                "notifier",
                env=notifier_env(settings),
                cwd=tmp_path,
                stdout=log,
                stderr=log,
            )
            started.append(process)
            return process

        return asyncio.ensure_future(spawn())

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        await process.wait()
    for log in logs:
        log.close()


async def messages(sessionmaker: Sessionmaker, receiver: WebhookReceiverDouble) -> dict[str, str]:
    """One message per path (half to jobs' own URLs, half to endpoints); path → secret."""
    secrets: dict[str, str] = {}
    async with unit_of_work(sessionmaker) as session:
        for index, path in enumerate([*PATHS, IN_FLIGHT]):
            account = await create_account(session)
            if index % 2:
                endpoint = await create_endpoint(session, account, url=receiver.url(path))
                job = await create_job(session, account)
                secrets[path] = endpoint.secret
            else:
                job = await create_job(session, account, webhook_url=receiver.url(path))
                secrets[path] = account.webhook_secret
            await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
    return secrets


async def test_killed_mid_schedule_and_restarted(
    sessionmaker: Sessionmaker,
    receiver: WebhookReceiverDouble,
    processes: Callable[[], asyncio.Future[asyncio.subprocess.Process]],
) -> None:
    for path in PATHS:
        receiver.script(path, Answer(500), Answer(503), Answer(200))
    # Held open past the kill: the first process never learns how this attempt ended.
    receiver.script(IN_FLIGHT, Answer(200, delay=30))
    secrets = await messages(sessionmaker, receiver)

    first = await processes()
    for path in [*PATHS, IN_FLIGHT]:
        await receiver.wait_for(1, path=path, within=60)
    first.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    mid_schedule = [
        d for d in await load_deliveries(sessionmaker) if d.status == "pending" and d.attempts
    ]
    assert len(mid_schedule) > 1, "the kill came after the schedule had ended"

    second = await processes()
    await eventually(lambda: settled(sessionmaker), within=60)
    second.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(second.wait(), timeout=30) == 0

    deliveries = await load_deliveries(sessionmaker)
    assert {d.status for d in deliveries} == {"delivered"}
    ids_by_path: defaultdict[str, set[str]] = defaultdict(set)
    for request in receiver.requests:
        ids_by_path[request.path].add(request.webhook_id)
        request.verify(secrets[request.path])
    # Every repeat carried its message's id, and no message was sent under two ids.
    assert all(len(ids) == 1 for ids in ids_by_path.values())
    assert {ids.pop() for ids in ids_by_path.values()} == {d.id for d in deliveries}
    for path in PATHS:
        assert [r.path for r in receiver.requests].count(path) >= 3
    in_flight = receiver.received(IN_FLIGHT)
    assert len(in_flight) == 2
    (repeat,) = [d for d in deliveries if d.url.endswith(IN_FLIGHT)]
    # Only the attempt that came back is in the log; the killed one left no row.
    assert [a.status_code for a in await load_attempts(sessionmaker, repeat.id)] == [200]
