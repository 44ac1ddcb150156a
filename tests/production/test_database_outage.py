"""PostgreSQL unreachable for a while: the API answers 503 with `Retry-After`, then recovers,
and nothing is half-written.

The API process reaches PostgreSQL through a loopback proxy the test cuts: first
blackholed (a network that drops packets: pooled connections stall mid-query, new ones
are never answered, and only the client's own timeouts end the wait), then refused (a
server that went away). Requests keep arriving the whole time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.engine import make_url

from aigen.backend.billing import service as billing
from aigen.bus.messages import Envelope
from aigen.models import CreditEntry, Job, OutboxMessage
from tests.fixtures.platform import Customer
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.stack import Stack

from .deployment import MARKS, POOL_SIZE, Production, open_production

pytestmark = MARKS

BODY = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}
HOLD = 6
# Short, so that a cut answers in seconds; production defaults are 5, 10 and 60 s. The
# pool's wait is the shortest here, so that requests beyond the pool's size meet it.
TIMEOUTS = {
    "AIGEN_DATABASE_CONNECT_TIMEOUT_SECONDS": "1.5",
    "AIGEN_DATABASE_POOL_TIMEOUT_SECONDS": "0.5",
    "AIGEN_DATABASE_COMMAND_TIMEOUT_SECONDS": "2",
    # Keys stay cached through the outage, so every request below reaches the pool (an
    # uncached key's lookups are shared, one per key, and fail together).
    "AIGEN_KEY_CACHE_SECONDS": "60",
}
# The longest a request may take while the database is away: a connect timeout, a
# statement timeout and a rollback's, with room for a loaded machine.
PATIENCE = 10.0
POOL = 2 * POOL_SIZE  # pool_size + max_overflow of the API's engine


@dataclass
class Load:
    """POSTs in a loop, `parallel` at a time, until stopped; keeps every answer."""

    client: httpx.AsyncClient
    who: Customer
    answers: list[httpx.Response] = field(default_factory=list)
    slowest: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, parallel: int = 4) -> None:
        await asyncio.gather(*(self._loop() for _ in range(parallel)))

    async def _loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            answer = await self.client.post("/v1/generate", json=BODY, headers=self.who.headers)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers.append(answer)
            await asyncio.sleep(0.05)


async def test_api_answers_503_while_postgres_is_away_then_recovers(
    s3_endpoint: str, tmp_path: Path
) -> None:
    async with open_production(s3_endpoint, tmp_path) as production:
        url = make_url(production.database_url)
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
        await proxy.start()
        stack = Stack(production.env, tmp_path)
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        try:
            api = await stack.start("api", env={"AIGEN_DATABASE_URL": proxied, **TIMEOUTS})
            assert api.url is not None
            who = await production.customer(credits=10_000)
            # Never seen by the API: its first request has to look the key up in the database.
            stranger = await production.customer(credits=10)
            # Idle connections are dropped before uvicorn's 5 s keep-alive ends them mid-reuse.
            limits = httpx.Limits(keepalive_expiry=2.0)
            async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as client:
                load = Load(client, who)
                running = asyncio.create_task(load.run())
                await asyncio.sleep(1.0)
                for mode in ("blackhole", "refuse"):
                    proxy.set(mode)
                    await asyncio.sleep(1.5)
                    await _answers_503(client, who, stranger)
                proxy.set("forward")
                recovered = await _wait_accepted(client, who)
                await asyncio.sleep(0.5)
                load.stop.set()
                await running
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
            print(
                f"\nrecovered {recovered:.1f} s after the proxy forwarded again;"
                f" slowest answer during the outage {load.slowest:.1f} s"
            )
        except BaseException:
            print(stack.tails())
            raise
        finally:
            await stack.aclose()
            await proxy.aclose()
        statuses = Counter(answer.status_code for answer in load.answers)
        assert set(statuses) == {202, 503}, statuses
        assert load.slowest < PATIENCE
        for answer in load.answers:
            if answer.status_code == 503:
                _assert_problem(answer)
        await _assert_nothing_half_written(production, who, load.answers)


async def _answers_503(client: httpx.AsyncClient, who: Customer, stranger: Customer) -> None:
    calls = [
        client.post("/v1/generate", json=BODY, headers=who.headers),
        client.get("/v1/generate", headers=who.headers),
        client.get("/v1/account", headers=stranger.headers),
    ]
    for call in calls:
        started = time.monotonic()
        answer = await call
        assert time.monotonic() - started < PATIENCE
        assert answer.status_code == 503, answer.text
        _assert_problem(answer)
    # More at once than the pool has connections: the rest wait for one, then give up too.
    burst = await asyncio.gather(
        *(client.get("/v1/generate", headers=who.headers) for _ in range(POOL + 10))
    )
    assert {answer.status_code for answer in burst} == {503}
    for answer in burst:
        _assert_problem(answer)
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"]
    checks = ready.json()["checks"]
    assert checks["database"].startswith("error")
    assert checks["broker"] == checks["storage"] == checks["redis"] == "ok"


def _assert_problem(answer: httpx.Response) -> None:
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert int(answer.headers["retry-after"]) >= 1
    problem = answer.json()
    assert problem["status"] == 503
    assert problem["code"] == "service_unavailable"
    assert problem["request_id"]


async def _wait_accepted(client: httpx.AsyncClient, who: Customer) -> float:
    """Seconds until a POST is accepted again."""
    started = time.monotonic()
    while True:
        answer = await client.post("/v1/generate", json=BODY, headers=who.headers)
        if answer.status_code == 202:
            return time.monotonic() - started
        assert time.monotonic() - started < 20, answer.text
        await asyncio.sleep(0.2)


async def _assert_nothing_half_written(
    production: Production, who: Customer, answers: list[httpx.Response]
) -> None:
    """Every job came with its hold and its event, or not at all; the books balance.

    A 503 whose commit had reached the server before the link was cut may still have
    made its job (the answer was lost, not the work): then it is whole too.
    """
    accepted = {answer.json()["id"] for answer in answers if answer.status_code == 202}
    async with production.sessionmaker() as session:
        jobs = set(await session.scalars(select(Job.id).where(Job.account_id == who.account_id)))
        holds = Counter(
            (
                await session.scalars(
                    select(CreditEntry.job_id).where(
                        CreditEntry.account_id == who.account_id, CreditEntry.kind == "hold"
                    )
                )
            ).all()
        )
        bodies = await session.scalars(
            select(OutboxMessage.body).where(
                OutboxMessage.account_id == who.account_id,
                OutboxMessage.type == "AIGenerationJobRequested",
            )
        )
        events = Counter(Envelope.from_json(body).job_id for body in bodies)
        balance = await billing.balance(session, who.account_id)
        assert balance == await billing.ledger_sum(session, who.account_id)
    assert accepted <= jobs
    assert holds == events == Counter(jobs)
    assert balance == 10_000 - HOLD * len(jobs)
