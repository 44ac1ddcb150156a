"""Offered load for the pipeline measurements, and the statistics of what came back.

`open_loop` sends at a fixed rate whatever the answers do (a request's clock starts at its
scheduled time, so a slow server cannot hide its queue: no coordinated omission);
`burst` sends a fixed number of jobs as fast as `concurrency` connections allow;
`saturate` keeps a fixed number of jobs in the pipeline for a fixed time (a new one for
each webhook that arrives), which measures the most jobs/s without an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .wire import Client, Receiver


@dataclass
class Sent:
    """Jobs accepted (job id → when its request was due) and requests refused."""

    at: dict[str, float] = field(default_factory=dict)
    refused: int = 0
    # Why: HTTP status, or the error's class name.
    reasons: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0


def job_body(model: str, webhook_url: str, tag: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "input": {"prompt": "Say one word."},
            "webhook_url": webhook_url,
            "metadata": {"bench": tag},
        }
    ).encode()


async def _post(client: Client, body: bytes, key: str, due: float, sent: Sent) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        answer = await client.post("/v1/generate", body, headers)
    except (OSError, asyncio.IncompleteReadError) as error:
        sent.refused += 1
        reason = type(error).__name__
        sent.reasons[reason] = sent.reasons.get(reason, 0) + 1
        return
    if answer.status == 202:
        sent.at[json.loads(answer.body)["id"]] = due
    else:
        sent.refused += 1
        sent.reasons[str(answer.status)] = sent.reasons.get(str(answer.status), 0) + 1


async def open_loop(client: Client, *, body: bytes, key: str, rate: float, seconds: float) -> Sent:
    """`rate` requests per second for `seconds`, each at its scheduled time."""
    sent = Sent()
    count = max(1, int(rate * seconds))
    start = time.perf_counter()
    sent.first = start
    tasks = []
    for index in range(count):
        due = start + index / rate
        pause = due - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        tasks.append(asyncio.create_task(_post(client, body, key, due, sent)))
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
    sent.last = time.perf_counter()
    return sent


async def burst(client: Client, *, body: bytes, key: str, count: int, concurrency: int) -> Sent:
    """`count` requests over `concurrency` connections, each sent as soon as one is free."""
    sent = Sent()
    sent.first = time.perf_counter()
    queue = iter(range(count))

    async def poster() -> None:
        for _ in queue:
            await _post(client, body, key, time.perf_counter(), sent)

    await asyncio.wait_for(asyncio.gather(*(poster() for _ in range(concurrency))), 300)
    sent.last = time.perf_counter()
    return sent


async def saturate(
    client: Client,
    receiver: Receiver,
    *,
    body: bytes,
    key: str,
    seconds: float,
    window: int = 48,
    posters: int = 8,
) -> Sent:
    """Keep `window` jobs between POST and webhook for `seconds`; then stop posting."""
    sent = Sent()
    sent.first = time.perf_counter()
    end = sent.first + seconds
    posting = 0

    def in_flight() -> int:
        done = sum(1 for job_id in sent.at if job_id in receiver.arrived)
        return len(sent.at) + posting - done

    async def poster() -> None:
        nonlocal posting
        while time.perf_counter() < end:
            if in_flight() >= window:
                await receiver.changed(0.05)
                continue
            posting += 1
            try:
                await _post(client, body, key, time.perf_counter(), sent)
            finally:
                posting -= 1

    await asyncio.wait_for(asyncio.gather(*(poster() for _ in range(posters))), seconds + 60)
    sent.last = time.perf_counter()
    return sent


def window_rate(arrivals: Sequence[float], start: float, end: float) -> float:
    """Events per second that happened between `start` and `end`."""
    count = sum(1 for t in arrivals if start <= t <= end)
    return count / (end - start) if end > start else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def steady_rate(times: Sequence[float]) -> float:
    """Events per second between the 10th and the 90th percentile event (steady state)."""
    if len(times) < 10:
        return float("nan")
    ordered = sorted(times)
    low, high = int(0.1 * len(ordered)), int(0.9 * len(ordered)) - 1
    span = ordered[high] - ordered[low]
    return (high - low) / span if span > 0 else float("nan")


@dataclass
class EndToEnd:
    jobs: int
    missing: int
    refused: int
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    reasons: dict[str, int] = field(default_factory=dict)


async def end_to_end(
    receiver: Receiver, sent: Sent, *, model_ms: float, timeout: float
) -> EndToEnd:
    """Wait for every accepted job's webhook; latency = webhook arrival − request due."""
    await receiver.wait_for(list(sent.at), timeout)
    arrivals = receiver.arrived
    latencies = [(arrivals[j] - t) * 1000 for j, t in sent.at.items() if j in arrivals]
    done_times = [arrivals[j] for j in sent.at if j in arrivals]
    overheads = [value - model_ms for value in latencies]
    return EndToEnd(
        jobs=len(sent.at),
        missing=len(sent.at) - len(latencies),
        refused=sent.refused,
        jobs_per_s=steady_rate(done_times),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        overhead_p50_ms=percentile(overheads, 50),
        overhead_p99_ms=percentile(overheads, 99),
        reasons=dict(sent.reasons),
    )
