"""`GET /v1/account`, `GET /v1/usage`, and the key's `last_used_at`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aigen.models import ApiKey
from tests.fixtures.platform import Api, Platform

from .test_errors import GOOD, assert_problem


class TestAccount:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.get("/v1/account"), 401)

    async def test_balance_limits_and_what_is_left(self, api: Api) -> None:
        customer = await api.customer(
            credits=100, rpm=10, concurrency=3, jobs_per_day=5, credits_per_month=50
        )
        async with api.client(customer) as client:
            job = (await client.post("/v1/generate", json=GOOD)).json()
            account = (await client.get("/v1/account")).json()
        assert account["balance"] == 100 - job["credits_reserved"]
        assert account["limits"] == {
            "requests_per_minute": 10,
            "concurrent_jobs": 3,
            "concurrent_jobs_in_use": 1,
            "jobs_per_day": 5,
            "jobs_per_month": None,
            "credits_per_day": None,
            "credits_per_month": 50,
        }
        left = account["remaining"]
        assert left["rpm"]["remaining"] == 8  # two requests so far
        assert left["rpm"]["window_seconds"] == 60
        assert left["concurrency"] == {
            "limit": 3,
            "remaining": 2,
            "reset_seconds": None,
            "window_seconds": None,
            "unit": "jobs",
        }
        assert left["jobs-per-day"]["remaining"] == 4
        assert left["jobs-per-day"]["unit"] == "jobs"
        assert left["credits-per-month"]["remaining"] == 50 - job["credits_reserved"]
        assert left["credits-per-month"]["unit"] == "credits"
        assert 0 < left["jobs-per-day"]["reset_seconds"] <= 86400
        assert "jobs-per-month" not in left

    async def test_last_used_is_stamped_once_a_minute(self, api: Api) -> None:
        customer = await api.customer()
        assert await last_used(api, customer.key_id) is None
        async with api.client(customer) as client:
            await client.get("/v1/account")
            first = await last_used(api, customer.key_id)
            assert first is not None
            assert datetime.now(UTC) - first < timedelta(seconds=10)
            await client.get("/v1/account")
        assert await last_used(api, customer.key_id) == first


async def last_used(api: Api, key_id: str) -> datetime | None:
    async with api.deps.sessionmaker() as session:
        row = await session.get(ApiKey, key_id)
        assert row is not None
        return row.last_used_at


class TestUsage:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.get("/v1/usage"), 401)

    async def test_by_model_by_day_and_entries(self, platform: Platform) -> None:
        customer = await platform.customer(credits=100)
        image = {"model": "scripted-image", "input": {"prompt": "a cat"}}
        async with platform.client(customer) as client:
            ids = [
                (await client.post("/v1/generate", json=body)).json()["id"]
                for body in (GOOD, GOOD, image)
            ]
            for job_id in ids:
                await platform.wait_status(job_id, {"completed"})
            await platform.assert_books_balance(customer.account_id)
            usage = (await client.get("/v1/usage")).json()
        today = datetime.now(UTC).date().isoformat()
        assert usage["object"] == "usage"
        assert usage["totals"] == {"jobs": 3, "credits_charged": 5 + 5 + 5}
        assert usage["by_model"] == [
            {"model": "scripted-image", "jobs": 1, "credits_charged": 5},
            {"model": "scripted-text", "jobs": 2, "credits_charged": 10},
        ]
        assert usage["by_day"] == [{"date": today, "jobs": 3, "credits_charged": 15}]
        kinds = sorted(entry["kind"] for entry in usage["entries"])
        assert kinds == ["capture"] * 3 + ["grant"] + ["hold"] * 3 + ["release"] * 3
        assert sum(entry["amount"] for entry in usage["entries"]) == 100 - 15
        assert usage["has_more"] is False

    async def test_period_and_pages(self, api: Api) -> None:
        customer = await api.customer(credits=100)
        async with api.client(customer) as client:
            for _ in range(3):
                await client.post("/v1/generate", json=GOOD)
            page = (await client.get("/v1/usage", params={"limit": 2})).json()
            assert len(page["entries"]) == 2
            assert page["has_more"] is True
            rest = (
                await client.get("/v1/usage", params={"limit": 2, "cursor": page["next_cursor"]})
            ).json()
            assert [e["kind"] for e in page["entries"] + rest["entries"]] == [
                "hold",
                "hold",
                "hold",
                "grant",
            ]
            past = (
                await client.get("/v1/usage", params={"from": "2020-01-01", "to": "2020-02-01"})
            ).json()
            assert past["entries"] == []
            assert past["totals"] == {"jobs": 0, "credits_charged": 0}
            assert past["from"].startswith("2020-01-01T00:00:00")
            backwards = await client.get(
                "/v1/usage", params={"from": "2020-02-01", "to": "2020-01-01"}
            )
            assert_problem(backwards, 422)
