"""Retry delays: the schedule by attempts made, jitter, throttling floors, Retry-After."""

from __future__ import annotations

import random
from datetime import timedelta
from email.utils import format_datetime

import pytest

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.notifications.schedule import next_delay, parse_retry_after


@pytest.fixture
def exact(settings: Settings) -> Settings:
    """The production schedule without jitter, so delays are exact."""
    return settings.model_copy(
        update={
            "webhook_retry_schedule": [0, 5, 300, 1800, 7200, 18000, 36000, 36000],
            "webhook_jitter": 0.0,
            "webhook_min_delay_after_throttle_seconds": 60.0,
        }
    )


class TestNextDelay:
    def test_index_is_attempts_made(self, exact: Settings) -> None:
        assert next_delay(1, exact) == 5
        assert next_delay(2, exact) == 300
        assert next_delay(7, exact) == 36000

    def test_exhausted(self, exact: Settings) -> None:
        assert next_delay(8, exact) is None
        assert next_delay(9, exact) is None

    def test_jitter_within_bounds(self, settings: Settings) -> None:
        jittery = settings.model_copy(update={"webhook_retry_schedule": [0, 100]})
        rng = random.Random(7)
        delays = [next_delay(1, jittery, rng=rng) for _ in range(500)]
        assert all(d is not None and 80 <= d <= 120 for d in delays)
        assert len({round(d or 0) for d in delays}) > 10

    @pytest.mark.parametrize(("status", "timed_out"), [(429, False), (None, True)])
    def test_throttle_floor(self, exact: Settings, status: int | None, timed_out: bool) -> None:
        assert next_delay(1, exact, status_code=status, timed_out=timed_out) == 60
        assert next_delay(3, exact, status_code=status, timed_out=timed_out) == 1800

    def test_no_floor_for_other_failures(self, exact: Settings) -> None:
        assert next_delay(1, exact, status_code=500) == 5

    @pytest.mark.parametrize(
        ("retry_after", "expected"),
        [("1", 300), ("450", 450), ("100000", 600), ("soon", 300)],
    )
    def test_retry_after_within_delay_and_double(
        self, exact: Settings, retry_after: str, expected: float
    ) -> None:
        assert next_delay(2, exact, status_code=503, retry_after=retry_after) == expected

    def test_retry_after_with_throttle_floor(self, exact: Settings) -> None:
        # 429 lifts 5 s to 60 s; Retry-After may then ask for up to 120 s.
        assert next_delay(1, exact, status_code=429, retry_after="3600") == 120

    def test_retry_after_http_date(self, exact: Settings) -> None:
        now = utcnow().replace(microsecond=0)
        header = format_datetime(now + timedelta(seconds=400), usegmt=True)
        assert next_delay(2, exact, retry_after=header, now=now) == 400


class TestParseRetryAfter:
    def test_seconds(self) -> None:
        assert parse_retry_after(" 120 ") == 120

    def test_past_date_is_zero(self) -> None:
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0

    @pytest.mark.parametrize("value", [None, "", "-5", "1.5", "tomorrow"])
    def test_unreadable(self, value: str | None) -> None:
        assert parse_retry_after(value) is None
