"""Calendar windows in UTC for the daily and monthly quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .base import Period


@dataclass(frozen=True, slots=True)
class Window:
    bucket: str
    remaining_seconds: float
    length_seconds: int


def current(period: Period, now: float) -> Window:
    """The calendar day or month (UTC) that holds `now` (seconds since the epoch)."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        bucket = start.strftime("d%Y%m%d")
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        bucket = start.strftime("m%Y%m")
    return Window(
        bucket=bucket,
        remaining_seconds=(end - moment).total_seconds(),
        length_seconds=int((end - start).total_seconds()),
    )
