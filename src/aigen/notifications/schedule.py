"""When to try a failed webhook delivery again (DESIGN §7).

`settings.webhook_retry_schedule[n]` is the delay after `n` attempts have been made: the
first entry (0, "at once") is the first attempt itself, so a schedule of eight entries
makes eight attempts. Each delay gets ±`webhook_jitter` so that receivers that failed
together are not hit together again. A timeout or a 429 waits at least
`webhook_min_delay_after_throttle_seconds`; a `Retry-After` answer is honoured within
[delay, 2 × delay], so a receiver can slow us down, but neither stall nor rush the schedule.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from aigen.clock import utcnow
from aigen.config import Settings

_rng = random.Random()


def next_delay(
    attempts_made: int,
    settings: Settings,
    *,
    status_code: int | None = None,
    timed_out: bool = False,
    retry_after: str | None = None,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before the next attempt, or None when the schedule is exhausted."""
    schedule = settings.webhook_retry_schedule
    if attempts_made >= len(schedule):
        return None
    jitter = settings.webhook_jitter
    delay = max(0.0, schedule[max(attempts_made, 0)] * (1 + (rng or _rng).uniform(-jitter, jitter)))
    if timed_out or status_code == 429:
        delay = max(delay, settings.webhook_min_delay_after_throttle_seconds)
    asked = parse_retry_after(retry_after, now=now)
    if asked is not None:
        delay = min(max(asked, delay), 2 * delay)
    return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """A `Retry-After` header in seconds from `now`: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; `-0000` parses as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())
