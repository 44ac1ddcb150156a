"""Every error the gateway gives is an RFC 9457 problem, and changes nothing (seed step 17)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from aigen.backend.key import service as key_service
from aigen.db.session import unit_of_work
from aigen.models import Account, Job
from tests.fixtures.platform import Api

GOOD = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}


def assert_problem(answer: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == answer.headers["x-request-id"]
    if code is not None:
        assert body["code"] == code
    return body


async def job_count(api: Api) -> int:
    async with api.deps.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


class TestAuth:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            answer = await client.post("/v1/generate", json=GOOD)
        assert_problem(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"] == "Bearer"

    async def test_unknown_key(self, api: Api) -> None:
        async with api.client(Authorization="Bearer aig_live_" + "a" * 32) as client:
            assert_problem(await client.get("/v1/account"), 401, "unauthorized")

    async def test_not_a_key(self, api: Api) -> None:
        async with api.client(**{"X-API-Key": "sk-something"}) as client:
            assert_problem(await client.get("/v1/account"), 401)

    async def test_x_api_key_header_works(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(**{"X-API-Key": customer.key}) as client:
            assert (await client.get("/v1/account")).status_code == 200

    async def test_revoked_key(self, api: Api) -> None:
        customer = await api.customer()
        async with unit_of_work(api.deps.sessionmaker) as session:
            await key_service.revoke(session, customer.key_id)
        async with api.client(customer) as client:
            assert_problem(await client.post("/v1/generate", json=GOOD), 403, "key_revoked")
        assert await job_count(api) == 0

    async def test_expired_key(self, api: Api) -> None:
        customer = await api.customer(expires_in_days=-1)
        async with api.client(customer) as client:
            assert_problem(await client.get("/v1/account"), 403, "key_expired")

    async def test_missing_scope(self, api: Api) -> None:
        customer = await api.customer(scopes=["read"])
        async with api.client(customer) as client:
            assert_problem(await client.post("/v1/generate", json=GOOD), 403, "insufficient_scope")

    async def test_suspended_account(self, api: Api) -> None:
        customer = await api.customer()
        async with unit_of_work(api.deps.sessionmaker) as session:
            account = await session.get(Account, customer.account_id)
            assert account is not None
            account.status = "suspended"
        async with api.client(customer) as client:
            assert_problem(await client.get("/v1/account"), 403, "account_suspended")


class TestBody:
    async def test_malformed_json(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            answer = await client.post(
                "/v1/generate", content=b'{"model": ', headers={"content-type": "application/json"}
            )
        assert_problem(answer, 400, "malformed_json")
        assert await job_count(api) == 0

    async def test_not_json(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            answer = await client.post(
                "/v1/generate", content=b"model=x", headers={"content-type": "text/plain"}
            )
        assert_problem(answer, 415, "unsupported_media_type")

    async def test_too_large(self, api: Api) -> None:
        customer = await api.customer()
        big = {"model": "scripted-text", "input": {"prompt": "x" * (300 * 1024)}}
        async with api.client(customer) as client:
            answer = await client.post("/v1/generate", json=big)
        assert_problem(answer, 413, "payload_too_large")
        assert await job_count(api) == 0

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"model": "no-such-model", "input": {"prompt": "x"}}, "unknown_model"),
            ({"model": "scripted-text", "input": {"prompt": "x", "colour": 1}}, "invalid_input"),
            (
                {"model": "scripted-text", "input": {"prompt": "x", "max_tokens": 0}},
                "invalid_input",
            ),
            ({"model": "scripted-text", "input": {}}, "invalid_input"),
            ({"model": "scripted-text", "input": {"prompt": "x"}, "extra": 1}, "validation_error"),
            ({"input": {"prompt": "x"}}, "validation_error"),
            ({**GOOD, "webhook_url": "not a url"}, "validation_error"),
            ({**GOOD, "deadline_s": -1}, "validation_error"),
        ],
    )
    async def test_unprocessable(self, api: Api, body: dict[str, Any], code: str) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            answer = await client.post("/v1/generate", json=body)
        assert_problem(answer, 422, code)
        assert await job_count(api) == 0


class TestMoneyAndLimits:
    async def test_insufficient_credits_is_402_not_429(self, api: Api) -> None:
        customer = await api.customer(credits=3)
        async with api.client(customer) as client:
            answer = await client.post("/v1/generate", json=GOOD)
            body = assert_problem(answer, 402, "insufficient_credits")
            assert body["balance"] == 3
            assert (await client.get("/v1/account")).json()["balance"] == 3
        assert await job_count(api) == 0

    async def test_rate_limit_429_with_retry_after(self, api: Api) -> None:
        customer = await api.customer(rpm=3)
        async with api.client(customer) as client:
            answers = [await client.get("/v1/account") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit"] == "3"
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        assert answers[0].headers["ratelimit-policy"] == '"rpm";q=3;w=60'
        assert_problem(answers[3], 429, "rate_limited")
        assert int(answers[3].headers["retry-after"]) >= 1

    async def test_concurrency_limit_429(self, api: Api) -> None:
        customer = await api.customer(concurrency=2)
        async with api.client(customer) as client:
            answers = [await client.post("/v1/generate", json=GOOD) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        assert_problem(answers[2], 429, "concurrency_limit")
        assert answers[2].headers["retry-after"]
        assert await job_count(api) == 2


class TestJobsOfOthers:
    async def test_another_accounts_job_is_404(self, api: Api) -> None:
        owner, other = await api.customer(), await api.customer()
        async with api.client(owner) as client:
            job_id = (await client.post("/v1/generate", json=GOOD)).json()["id"]
        async with api.client(other) as client:
            for path in (f"/v1/generate/{job_id}", f"/v1/generate/{job_id}/status"):
                assert_problem(await client.get(path), 404, "job_not_found")
            assert_problem(await client.post(f"/v1/generate/{job_id}/cancel"), 404)
            assert (await client.get("/v1/generate")).json()["data"] == []

    async def test_unknown_route_is_problem(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.get("/v1/nothing-here"), 404)

    async def test_cancel_twice_is_409(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            job_id = (await client.post("/v1/generate", json=GOOD)).json()["id"]
            assert (await client.post(f"/v1/generate/{job_id}/cancel")).status_code == 200
            assert_problem(await client.post(f"/v1/generate/{job_id}/cancel"), 409)


class TestList:
    async def test_newest_first_with_cursor(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            ids = [(await client.post("/v1/generate", json=GOOD)).json()["id"] for _ in range(5)]
            first = (await client.get("/v1/generate", params={"limit": 3})).json()
            assert [j["id"] for j in first["data"]] == ids[::-1][:3]
            assert first["has_more"] is True
            second = (
                await client.get(
                    "/v1/generate", params={"limit": 3, "cursor": first["next_cursor"]}
                )
            ).json()
            assert [j["id"] for j in second["data"]] == ids[::-1][3:]
            assert second["has_more"] is False


class TestWebhookURL:
    async def test_an_unsafe_address_is_refused_at_once_and_changes_nothing(
        self, strict_api: Api
    ) -> None:
        customer = await strict_api.customer(credits=50)
        async with strict_api.client(customer) as client:
            for url, reason in (
                ("http://169.254.169.254/latest/meta-data/", "link-local"),
                ("http://10.0.0.1/hook", "private"),
                ("http://127.0.0.1:8080/hook", "loopback"),
            ):
                answer = await client.post("/v1/generate", json={**GOOD, "webhook_url": url})
                body = assert_problem(answer, 422, "unsafe_webhook_url")
                assert reason in body["detail"], (url, body["detail"])
            assert (await client.get("/v1/account")).json()["balance"] == 50
        assert await job_count(strict_api) == 0

    async def test_a_host_name_is_accepted_and_checked_at_each_attempt(
        self, strict_api: Api
    ) -> None:
        customer = await strict_api.customer(credits=50)
        async with strict_api.client(customer) as client:
            body = {**GOOD, "webhook_url": "https://hooks.example.com/aigen"}
            answer = await client.post("/v1/generate", json=body)
        assert answer.status_code == 202, answer.text
        assert answer.json()["webhook_url"] == "https://hooks.example.com/aigen"
