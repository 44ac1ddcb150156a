"""`Prefer: wait=N` (RFC 7240) on `POST /v1/generate`: answer with the finished job if it
ends within N seconds (at most 60).

The wait reads the job's status in short read-only sessions and holds no transaction and
no connection in between, so waiting requests cost the database a cheap primary-key read
each and block nothing. It reads again as soon as the job's end is told (the notices of
`aigen.db.notices`, which this process hears), and otherwise once a second, for a notice
that was lost; while it hears no notices it polls, backing off from 50 ms to 500 ms.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import select

from aigen.db.notices import Listener
from aigen.db.session import Sessionmaker
from aigen.models import Job
from aigen.models.job import TERMINAL

MAX_WAIT_SECONDS = 60
FIRST_POLL_SECONDS = 0.05
LAST_POLL_SECONDS = 0.5
# While notices are heard: how often to read the status all the same.
NOTICED_POLL_SECONDS = 1.0


def parse_prefer(value: str | None) -> int | None:
    """The `wait` preference in seconds, capped at 60; None when absent or malformed.

    Preferences are hints (RFC 7240 §2): one that cannot be read is ignored, not refused.
    """
    if not value:
        return None
    for preference in value.split(","):
        token = preference.split(";", 1)[0]
        name, _, raw = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        text = raw.strip().strip('"')
        if text.isdigit():
            return min(int(text), MAX_WAIT_SECONDS)
    return None


async def wait_for_end(
    sessionmaker: Sessionmaker, job_id: str, *, seconds: float, ended: Listener | None = None
) -> bool:
    """Whether the job reached a terminal status within `seconds`; with `ended`, the
    listener of `job_service.ENDED`, it knows as soon as the backend has committed it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = FIRST_POLL_SECONDS
    with ended.watch(job_id) if ended is not None else contextlib.nullcontext() as watch:
        while True:
            async with sessionmaker() as session:
                status = await session.scalar(select(Job.status).where(Job.id == job_id))
            if status in TERMINAL:
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            if watch is not None and watch.hearing:
                await watch.wait(min(NOTICED_POLL_SECONDS, left))
            else:
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, LAST_POLL_SECONDS)
