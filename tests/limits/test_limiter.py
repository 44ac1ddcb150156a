"""The limiter contract (DESIGN §6), run against both implementations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from aigen.limits import Decision, Limiter, Quota

from .conftest import FakeClock, Limiters


def left(decision: Decision, policy: str) -> int:
    state = decision.get(policy)
    assert state is not None, policy
    return state.remaining


def refused_by(decision: Decision) -> str | None:
    return decision.denied.name if decision.denied else None


def jobs_day(limit: int, cost: int = 1) -> Quota:
    return Quota("jobs", "day", limit, cost)


def credits_day(limit: int, cost: int) -> Quota:
    return Quota("credits", "day", limit, cost)


def credits_month(limit: int, cost: int) -> Quota:
    return Quota("credits", "month", limit, cost)


class TestRate:
    async def test_burst_of_n_then_refused(self, limiter: Limiter) -> None:
        answers = [await limiter.admit("k", per_minute=3) for _ in range(4)]
        assert [a.allowed for a in answers] == [True, True, True, False]
        assert [a.policies[0].remaining for a in answers] == [2, 1, 0, 0]
        refused = answers[3]
        assert refused_by(refused) == "rpm"
        assert refused.retry_after == pytest.approx(20.0)

    async def test_refills_one_per_interval(self, limiter: Limiter, clock: FakeClock) -> None:
        for _ in range(3):
            assert (await limiter.admit("k", per_minute=3)).allowed
        clock.advance(19.9)
        assert not (await limiter.admit("k", per_minute=3)).allowed
        clock.advance(0.2)
        assert (await limiter.admit("k", per_minute=3)).allowed
        assert not (await limiter.admit("k", per_minute=3)).allowed
        clock.advance(60)
        answers = [await limiter.admit("k", per_minute=3) for _ in range(4)]
        assert [a.allowed for a in answers] == [True, True, True, False]

    async def test_keys_are_independent(self, limiter: Limiter) -> None:
        assert (await limiter.admit("a", per_minute=1)).allowed
        assert not (await limiter.admit("a", per_minute=1)).allowed
        assert (await limiter.admit("b", per_minute=1)).allowed

    async def test_headers_single_policy(self, limiter: Limiter) -> None:
        headers = (await limiter.admit("k", per_minute=3)).headers()
        assert headers["RateLimit-Policy"] == '"rpm";q=3;w=60'
        assert headers["RateLimit"] == '"rpm";r=2;t=20'
        assert headers["X-RateLimit-Limit"] == "3"
        assert headers["X-RateLimit-Remaining"] == "2"
        assert headers["X-RateLimit-Reset"] == "20"

    async def test_exactly_n_of_many_at_once(self, limiters: Limiters) -> None:
        # Two "processes" (two clients on one Redis; one dict in process) share the limit.
        first, second = limiters.shared(), limiters.shared()
        answers = await asyncio.gather(
            *((first if i % 2 else second).admit("k", per_minute=60) for i in range(100))
        )
        assert sum(a.allowed for a in answers) == 60


class TestQuotas:
    async def test_jobs_per_day(self, limiter: Limiter) -> None:
        answers = [await limiter.admit("k", per_minute=100, quotas=[jobs_day(2)]) for _ in range(3)]
        assert [a.allowed for a in answers] == [True, True, False]
        refused = answers[2]
        assert refused_by(refused) == "jobs-per-day"
        # 12:00 UTC: the day's quota is back at midnight.
        assert refused.retry_after == pytest.approx(12 * 3600)
        assert left(refused, "jobs-per-day") == 0

    async def test_all_or_nothing(self, limiter: Limiter) -> None:
        quotas = [jobs_day(10), credits_day(10, 8)]
        assert (await limiter.admit("k", per_minute=3, quotas=quotas)).allowed
        refused = await limiter.admit("k", per_minute=3, quotas=quotas)
        assert not refused.allowed
        assert refused_by(refused) == "credits-per-day"
        # Nothing was counted: the rate still has 2 left, the jobs quota 9.
        assert left(refused, "rpm") == 2
        assert left(refused, "jobs-per-day") == 9
        peek = await limiter.admit("k", per_minute=3, quotas=[jobs_day(10, 0), credits_day(10, 0)])
        assert peek.allowed
        assert left(peek, "jobs-per-day") == 9
        assert left(peek, "credits-per-day") == 2

    async def test_rate_refusal_takes_no_quota(self, limiter: Limiter) -> None:
        assert (await limiter.admit("k", per_minute=1, quotas=[jobs_day(5)])).allowed
        refused = await limiter.admit("k", per_minute=1, quotas=[jobs_day(5)])
        assert refused_by(refused) == "rpm"
        assert left(refused, "jobs-per-day") == 4

    async def test_read_never_refused(self, limiter: Limiter) -> None:
        assert (await limiter.admit("k", per_minute=10, quotas=[jobs_day(1)])).allowed
        peek = await limiter.admit("k", per_minute=10, quotas=[jobs_day(1, 0)])
        assert peek.allowed

    async def test_headers_name_every_policy(self, limiter: Limiter) -> None:
        decision = await limiter.admit(
            "k", per_minute=60, quotas=[jobs_day(100), credits_month(1000, 250)]
        )
        headers = decision.headers()
        assert headers["RateLimit-Policy"] == (
            '"rpm";q=60;w=60, "jobs-per-day";q=100;w=86400, '
            '"credits-per-month";q=1000;w=2678400;qu="credits"'
        )
        assert headers["RateLimit"] == (
            '"rpm";r=59;t=1, "jobs-per-day";r=99;t=43200, "credits-per-month";r=750;t=1425600'
        )
        # The X- trio names the policy with the least left: credits (75 %).
        assert headers["X-RateLimit-Limit"] == "1000"
        assert headers["X-RateLimit-Remaining"] == "750"

    async def test_windows_roll_over(self, limiter: Limiter, clock: FakeClock) -> None:
        quotas = [jobs_day(1), Quota("jobs", "month", 2, 1)]
        assert (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed
        assert not (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed
        clock.advance(12 * 3600)  # the next UTC day
        assert (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed
        clock.advance(24 * 3600)
        refused = await limiter.admit("k", per_minute=100, quotas=quotas)
        assert refused_by(refused) == "jobs-per-month"
        clock.now = datetime(2030, 2, 1, tzinfo=UTC).timestamp()
        assert (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed


class TestGiveBackAndRefund:
    async def test_give_back_returns_everything_once(self, limiter: Limiter) -> None:
        quotas = [jobs_day(1), credits_day(10, 10)]
        assert (await limiter.admit("k", per_minute=100, quotas=quotas, reservation="j1")).allowed
        assert not (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed
        await limiter.give_back("k", "j1")
        await limiter.give_back("k", "j1")
        assert (await limiter.admit("k", per_minute=100, quotas=quotas, reservation="j2")).allowed
        assert not (await limiter.admit("k", per_minute=100, quotas=quotas)).allowed

    async def test_refund_returns_unspent_credits_once(self, limiter: Limiter) -> None:
        quotas = [jobs_day(10), credits_day(10, 8)]
        assert (await limiter.admit("k", per_minute=100, quotas=quotas, reservation="j1")).allowed
        # The job was charged 3 of its 8: 5 come back, once, however often it is said.
        await limiter.refund("k", "j1", credits=5)
        await limiter.refund("k", "j1", credits=5)
        peek = await limiter.admit(
            "k", per_minute=100, quotas=[jobs_day(10, 0), credits_day(10, 0)]
        )
        assert left(peek, "credits-per-day") == 7
        assert left(peek, "jobs-per-day") == 9  # an accepted job stays counted

    async def test_refund_goes_to_the_day_it_was_taken(
        self, limiter: Limiter, clock: FakeClock
    ) -> None:
        assert (
            await limiter.admit("k", per_minute=100, quotas=[credits_day(10, 10)], reservation="j")
        ).allowed
        clock.advance(12 * 3600)
        assert (await limiter.admit("k", per_minute=100, quotas=[credits_day(10, 10)])).allowed
        await limiter.refund("k", "j", credits=10)
        # Yesterday got its credits back; today's quota is not inflated by them.
        assert not (await limiter.admit("k", per_minute=100, quotas=[credits_day(10, 1)])).allowed

    async def test_unknown_reservation_is_a_no_op(self, limiter: Limiter) -> None:
        await limiter.give_back("k", "nothing")
        await limiter.refund("k", "nothing", credits=5)
        assert (await limiter.admit("k", per_minute=1)).allowed

    async def test_shared_across_processes(self, limiters: Limiters) -> None:
        first, second = limiters.shared(), limiters.shared()
        quotas = [credits_day(10, 10)]
        assert (await first.admit("k", per_minute=100, quotas=quotas, reservation="j")).allowed
        assert not (await second.admit("k", per_minute=100, quotas=quotas)).allowed
        await second.refund("k", "j", credits=10)
        assert (await first.admit("k", per_minute=100, quotas=quotas)).allowed
