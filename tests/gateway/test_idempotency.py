"""`Idempotency-Key` on `POST /v1/generate` (DESIGN §3): a retry never makes a second job."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from sqlalchemy import update

from aigen.backend.billing import service as billing
from aigen.backend.idempotency import service as idempotency_service
from aigen.clock import utcnow
from aigen.db.session import unit_of_work
from aigen.gateway.idempotency import fingerprint
from aigen.models import IdempotencyKey
from tests.fixtures.platform import Api, Customer

from .test_errors import GOOD, assert_problem, job_count

KEY = {"Idempotency-Key": "order-42"}


async def balance(api: Api, customer: Customer) -> int:
    async with api.deps.sessionmaker() as session:
        return await billing.balance(session, customer.account_id)


class TestReplay:
    async def test_same_key_same_body_replays(self, api: Api) -> None:
        customer = await api.customer(credits=100, rpm=5)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=KEY)
            again = await client.post("/v1/generate", json=GOOD, headers=KEY)
        assert first.status_code == again.status_code == 202
        assert "idempotent-replayed" not in first.headers
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        assert again.headers["location"] == first.headers["location"]
        assert again.headers["retry-after"] == first.headers["retry-after"]
        # The replay is a request too: its own rate-limit headers.
        assert '"rpm";r=4;' in first.headers["ratelimit"]
        assert '"rpm";r=3;' in again.headers["ratelimit"]
        assert await job_count(api) == 1
        assert await balance(api, customer) == 100 - first.json()["credits_reserved"]

    async def test_key_order_and_spacing_do_not_matter(self, api: Api) -> None:
        customer = await api.customer()
        reordered = json.dumps({"input": GOOD["input"], "model": GOOD["model"]}, indent=2)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=KEY)
            again = await client.post(
                "/v1/generate",
                content=reordered,
                headers={**KEY, "content-type": "application/json"},
            )
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]

    async def test_quoted_key_is_the_same_key(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=KEY)
            again = await client.post(
                "/v1/generate", json=GOOD, headers={"Idempotency-Key": '"order-42"'}
            )
        assert again.json()["id"] == first.json()["id"]

    async def test_replay_even_when_the_quota_is_used_up(self, api: Api) -> None:
        customer = await api.customer(jobs_per_day=1)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=KEY)
            again = await client.post("/v1/generate", json=GOOD, headers=KEY)
            other = await client.post("/v1/generate", json=GOOD)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert_problem(other, 429, "quota_exceeded")


class TestRefusals:
    async def test_other_body_is_422(self, api: Api) -> None:
        customer = await api.customer()
        other = {**GOOD, "input": {"prompt": "something else"}}
        async with api.client(customer) as client:
            await client.post("/v1/generate", json=GOOD, headers=KEY)
            answer = await client.post("/v1/generate", json=other, headers=KEY)
        assert_problem(answer, 422, "idempotency_key_reused")
        assert await job_count(api) == 1

    async def test_first_in_flight_is_409(self, api: Api) -> None:
        customer = await api.customer()
        async with unit_of_work(api.deps.sessionmaker) as session:
            await idempotency_service.claim(
                session,
                api_key_id=customer.key_id,
                key="order-42",
                request_hash=fingerprint(json.dumps(GOOD).encode()),
            )
        async with api.client(customer) as client:
            answer = await client.post("/v1/generate", json=GOOD, headers=KEY)
        body = assert_problem(answer, 409, "idempotency_key_in_flight")
        assert body["retryable"] is True
        assert answer.headers["retry-after"] == "1"
        assert await job_count(api) == 0

    async def test_bad_key_is_400(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            for bad in (b"x" * 256, b"", "ключ".encode()):
                headers = {"Idempotency-Key": bad}
                answer = await client.post("/v1/generate", json=GOOD, headers=headers)
                assert_problem(answer, 400, "invalid_idempotency_key")
        assert await job_count(api) == 0


class TestConcurrency:
    async def test_concurrent_duplicates_make_one_job(self, api: Api) -> None:
        customer = await api.customer(credits=1000)
        async with api.client(customer) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/generate", json=GOOD, headers=KEY) for _ in range(10))
            )
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) <= {202, 409}, statuses
        accepted = [a for a in answers if a.status_code == 202]
        assert len({a.json()["id"] for a in accepted}) == 1
        assert sum("idempotent-replayed" not in a.headers for a in accepted) == 1
        assert await job_count(api) == 1

    async def test_keys_of_different_api_keys_are_independent(self, api: Api) -> None:
        one, two = await api.customer(), await api.customer()
        async with api.client(one) as first, api.client(two) as second:
            a = await first.post("/v1/generate", json=GOOD, headers=KEY)
            b = await second.post("/v1/generate", json=GOOD, headers=KEY)
        assert a.status_code == b.status_code == 202
        assert a.json()["id"] != b.json()["id"]
        assert "idempotent-replayed" not in b.headers
        assert await job_count(api) == 2


class TestRetryAfterFailure:
    async def test_refused_job_frees_the_key(self, api: Api) -> None:
        customer = await api.customer(credits=1)
        async with api.client(customer) as client:
            assert_problem(await client.post("/v1/generate", json=GOOD, headers=KEY), 402)
            async with unit_of_work(api.deps.sessionmaker) as session:
                await billing.grant(session, customer.account_id, 100)
            again = await client.post("/v1/generate", json=GOOD, headers=KEY)
        assert again.status_code == 202
        assert "idempotent-replayed" not in again.headers
        assert await job_count(api) == 1

    async def test_expired_key_starts_afresh(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD, headers=KEY)
            async with unit_of_work(api.deps.sessionmaker) as session:
                await session.execute(
                    update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1))
                )
            other = {**GOOD, "input": {"prompt": "new"}}
            again = await client.post("/v1/generate", json=other, headers=KEY)
        assert again.status_code == 202
        assert again.json()["id"] != first.json()["id"]

    async def test_abandoned_claim_is_taken_over(self, api: Api) -> None:
        customer = await api.customer()
        async with unit_of_work(api.deps.sessionmaker) as session:
            owned = await idempotency_service.claim(
                session, api_key_id=customer.key_id, key="order-42", request_hash="h"
            )
            await session.execute(
                update(IdempotencyKey).values(created_at=utcnow() - timedelta(minutes=5))
            )
        async with api.client(customer) as client:
            answer = await client.post("/v1/generate", json=GOOD, headers=KEY)
        assert answer.status_code == 202
        # The dead owner, back from the grave, can no longer complete the key.
        assert isinstance(owned, idempotency_service.Claim)
        async with unit_of_work(api.deps.sessionmaker) as session:
            try:
                await idempotency_service.complete(
                    session, owned, status=202, body="{}", headers={}
                )
            except idempotency_service.IdempotencyKeyInFlightError:
                pass
            else:
                raise AssertionError("a stale owner completed the key")

    async def test_purge_deletes_expired_keys(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            await client.post("/v1/generate", json=GOOD, headers=KEY)
        async with unit_of_work(api.deps.sessionmaker) as session:
            assert await idempotency_service.purge_expired(session) == 0
            later = utcnow() + timedelta(hours=24, seconds=1)
            assert await idempotency_service.purge_expired(session, now=later) == 1


async def test_openapi_documents_the_optional_headers(api: Api) -> None:
    # The route reads them from the request itself; the document must still show them.
    async with api.client() as client:
        document = (await client.get("/openapi.json")).json()
    parameters = document["paths"]["/v1/generate"]["post"]["parameters"]
    by_name = {p["name"]: p for p in parameters}
    assert set(by_name) == {"Idempotency-Key", "Prefer"}
    assert all(p["in"] == "header" and not p["required"] for p in parameters)
    assert "replays the first answer" in by_name["Idempotency-Key"]["description"]
