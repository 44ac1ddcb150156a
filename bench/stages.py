"""Where a job's time goes between `POST` and webhook, from the processes' JSON logs.

Every part logs a line with the job id at its step (`workflow.claimed`,
`workflow.finished`, `backend.applied`, `notifier.enqueued`); with the time the request
was due and the time its webhook arrived, each job yields the time spent in each leg.
"""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime
from pathlib import Path

from .load import Sent, percentile

STEPS = ("workflow.claimed", "workflow.finished", "backend.applied", "notifier.enqueued")
LEGS = (
    "POST → worker claimed",
    "claimed → result announced",
    "announced → backend applied",
    "applied → notifier enqueued",
    "enqueued → webhook arrived",
)
# perf_counter() + this = the wall clock the logs use.
WALL_OFFSET = time.time() - time.perf_counter()


def _log_times(folder: Path, jobs: set[str]) -> dict[str, dict[str, float]]:
    seen: dict[str, dict[str, float]] = {}
    for path in folder.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"job_id"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                data = json.loads(line)
                job, step = data["job_id"], data["event"]
                if job in jobs and step in STEPS:
                    seen.setdefault(job, {}).setdefault(step, _wall(data["timestamp"]))
    return seen


def legs(folder: Path, sent: Sent, arrived: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Leg → (p50, p99) in ms, over the jobs whose every step was logged."""
    steps = _log_times(folder, set(sent.at))
    spans: dict[str, list[float]] = {leg: [] for leg in LEGS}
    for job, due in sent.at.items():
        logged = steps.get(job, {})
        if job not in arrived or any(step not in logged for step in STEPS):
            continue
        points = [
            due + WALL_OFFSET,
            *(logged[step] for step in STEPS),
            arrived[job] + WALL_OFFSET,
        ]
        for leg, start, end in zip(LEGS, points, points[1:], strict=False):
            spans[leg].append((end - start) * 1000)
    return {leg: (percentile(v, 50), percentile(v, 99)) for leg, v in spans.items() if v}


def first_claim(log: Path) -> float | None:
    """When the process whose log this is claimed its first job (wall clock), if it did."""
    for line in log.read_text(errors="replace").splitlines():
        if '"workflow.claimed"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return _wall(json.loads(line)["timestamp"])
    return None


def _wall(stamp: str) -> float:
    """A JSON log line's ISO timestamp (UTC, `Z`) as seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
