"""`Prefer: wait=N` on `POST /v1/generate` (DESIGN §3)."""

from __future__ import annotations

import asyncio
import time

import pytest

from aigen.gateway import waiting
from aigen.gateway.waiting import parse_prefer
from tests.fixtures.platform import Api, Platform

from .test_errors import GOOD


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("wait=5", 5),
        ("respond-async, wait=10", 10),
        ("wait=600", 60),
        ('wait="7"', 7),
        ("WAIT=3;x=1", 3),
        ("wait=-1", None),
        ("wait=soon", None),
        ("respond-async", None),
        (None, None),
    ],
)
def test_parse_prefer(header: str | None, seconds: int | None) -> None:
    assert parse_prefer(header) == seconds


class TestWithWorker:
    async def test_finished_in_time_is_200(self, platform: Platform) -> None:
        customer = await platform.customer()
        async with platform.client(customer) as client:
            answer = await client.post("/v1/generate", json=GOOD, headers={"Prefer": "wait=10"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["preference-applied"] == "wait=10"
        job = answer.json()
        assert job["status"] == "completed"
        assert job["credits_charged"] == 5
        assert job["assets"][0]["url"]
        assert answer.headers["content-location"].endswith(f"/v1/generate/{job['id']}")

    async def test_failed_in_time_is_200_too(self, platform: Platform) -> None:
        customer = await platform.customer()
        broken = {"model": "scripted-broken", "input": {"prompt": "x"}}
        async with platform.client(customer) as client:
            answer = await client.post("/v1/generate", json=broken, headers={"Prefer": "wait=10"})
        assert answer.status_code == 200
        assert answer.json()["status"] == "failed"
        assert answer.json()["credits_charged"] == 0

    async def test_replay_gives_the_answer_sent(self, platform: Platform) -> None:
        customer = await platform.customer()
        headers = {"Prefer": "wait=10", "Idempotency-Key": "k1"}
        async with platform.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=headers)
            again = await client.post("/v1/generate", json=GOOD, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["status"] == "completed"

    async def test_the_answer_comes_when_the_job_ends(
        self, platform: Platform, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # No poll within the test's patience: only the notice of the job's end can wake
        # the wait before its 30 s are up.
        monkeypatch.setattr(waiting, "NOTICED_POLL_SECONDS", 3600.0)
        monkeypatch.setattr(waiting, "FIRST_POLL_SECONDS", 3600.0)
        customer = await platform.customer()
        slow = {"model": "scripted-slow", "input": {"prompt": "x"}}
        async with platform.client(customer) as client:
            started = time.monotonic()
            answer = await client.post("/v1/generate", json=slow, headers={"Prefer": "wait=30"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "completed"
        assert time.monotonic() - started < 15  # the model takes 1.5 s


class TestWithoutWorker:
    async def test_not_finished_is_the_usual_202(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            started = time.monotonic()
            answer = await client.post("/v1/generate", json=GOOD, headers={"Prefer": "wait=1"})
        assert 1.0 <= time.monotonic() - started < 5
        assert answer.status_code == 202
        assert answer.json()["status"] == "pending"
        assert answer.headers["location"].endswith(answer.json()["id"])
        assert answer.headers["preference-applied"] == "wait=1"

    async def test_waiting_holds_no_transaction(self, api: Api) -> None:
        # On SQLite a held write transaction would block every other POST for the wait.
        customer = await api.customer()
        async with api.client(customer) as client:
            waiting = asyncio.create_task(
                client.post("/v1/generate", json=GOOD, headers={"Prefer": "wait=3"})
            )
            await asyncio.sleep(0.3)
            started = time.monotonic()
            other = await client.post("/v1/generate", json=GOOD)
            took = time.monotonic() - started
            assert other.status_code == 202
            assert not waiting.done()
            assert took < 2.0
            assert (await waiting).status_code == 202
