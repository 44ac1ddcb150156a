"""`python -m bench [--quick]`: aigen's benchmarks, side by side, in one bounded run.

Sections (each can be picked with `--only`):

- accept:   `POST /v1/generate` on the embedded default (SQLite, database queue) and on
            PostgreSQL + Redis + RabbitMQ, each one `aigen api` process, against the bare
            FastAPI endpoint of `bench/bare_app.py`; wrk, alternating bare, a, b, bare, …;
            then each at 80 % of its own measured maximum (paced wrk connections).
- pipeline: `POST` → webhook received, scripted model at 0 and 200 ms, at a fixed
            offered rate (open loop), on `aigen up` (embedded) and on api + worker +
            backend + notifier + relay processes (production); then the most jobs/s at 0 ms.
- scale:    workflow throughput with 1 and 2 `aigen worker` processes at 200 ms, for
            several `AIGEN_WORKER_CONCURRENCY` values, draining a backlog made beforehand.
- memory:   VmRSS of the `api`, `worker` and `up` processes, idle and at their peak.

Everything it starts lives under a temporary folder, a PostgreSQL database per section
(`aigen_bench_<random>_<section>`), a RabbitMQ namespace and a Redis prefix of its own;
all of it is removed at the end, and every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from tests.fixtures.scratch import free_port

from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker
from aigen.models import OutboxMessage

from . import dbwork, machine
from .infra import Proc, Resources, customer, migrate, wait_http
from .load import (
    EndToEnd,
    burst,
    end_to_end,
    job_body,
    open_loop,
    saturate,
    steady_rate,
    window_rate,
)
from .profile import libraries, record
from .stages import LEGS, first_claim, legs
from .wire import Client, Receiver
from .wrk import WrkResult, run_wrk


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs; `--quick` shrinks it."""

    accept_seconds: float = 10.0
    accept_rounds: int = 3
    warm_seconds: float = 3.0
    paced_seconds: float = 10.0
    connections: int = 32
    pipe_rate: float = 100.0
    pipe_seconds: float = 15.0
    saturate_seconds: float = 20.0
    drain_seconds: float = 40.0
    # With no load, after a settling second: how much CPU the parts spend idle.
    idle_seconds: float = 10.0
    scale_concurrency: tuple[int, ...] = (1, 4, 16, 64)
    worker_concurrency: int = 64


FULL = Plan()
QUICK = Plan(
    accept_seconds=4.0,
    accept_rounds=2,
    warm_seconds=2.0,
    paced_seconds=4.0,
    pipe_seconds=5.0,
    saturate_seconds=8.0,
    drain_seconds=20.0,
    idle_seconds=5.0,
    scale_concurrency=(1, 16),
)
SECTIONS = ("accept", "pipeline", "scale")


@dataclass
class Report:
    plan: Plan
    started: float = field(default_factory=time.time)
    accept: dict[str, list[WrkResult]] = field(default_factory=dict)
    accept_ratio: dict[str, list[float]] = field(default_factory=dict)
    # CPU ms per request of the process serving it (what the requests/s mostly follow).
    accept_cpu: dict[str, list[float]] = field(default_factory=dict)
    paced: dict[str, tuple[float, WrkResult]] = field(default_factory=dict)
    pipeline: dict[str, EndToEnd] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    # PostgreSQL's work per job in the same run (`dbwork`): the production stack only.
    db_work: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per cent of a core each process spends with no load at all (its polling loops).
    idle_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    legs: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    scale: dict[tuple[int, int], float] = field(default_factory=dict)
    memory: dict[str, tuple[float, float]] = field(default_factory=dict)
    # With --profile: each profiled process's py-spy samples by library (`profile.owner`).
    libraries: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class RssPeak:
    """Samples the resident size of some processes every 0.25 s; keeps each one's peak."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.idle = {name: proc.rss_mb() or 0.0 for name, proc in procs.items()}
        self.peak = dict(self.idle)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], proc.rss_mb() or 0.0)
            await asyncio.sleep(0.25)

    def __enter__(self) -> RssPeak:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def into(self, report: Report, prefix: str) -> None:
        for name in self.procs:
            report.memory[f"{prefix} {name}"] = (self.idle[name], self.peak[name])


async def idle_cpu(procs: dict[str, Proc], seconds: float) -> dict[str, float]:
    """Per cent of a core each process spends over `seconds` with nothing to do.

    The first second is left out: the polling loops wait longer and longer once they
    find nothing (`aigen.aio.IdlePoll`), and the warm-up's jobs have only just ended.
    """
    await asyncio.sleep(1.0)
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    await asyncio.sleep(seconds)
    return {
        name: 100 * (proc.cpu_seconds() - before[name]) / seconds for name, proc in procs.items()
    }


# Accept path ---------------------------------------------------------------------------


ACCEPT_BODY = job_body("bench-0ms", "http://127.0.0.1:9/hook", "accept").decode()


async def accept(
    res: Resources, plan: Plan, report: Report, log_level: str, *, profile: bool
) -> None:
    emb_dir = res.folder("accept-embedded")
    emb_env = res.env(emb_dir, production=False, log_level=log_level)
    emb_db = f"sqlite+aiosqlite:///{emb_dir / 'aigen.db'}"
    pg_db = await res.postgres_database("accept")
    prod_dir = res.folder("accept-production")
    prod_env = res.env(prod_dir, production=True, log_level=log_level, AIGEN_DATABASE_URL=pg_db)
    await migrate(emb_db)
    await migrate(pg_db)

    port = free_port()
    bare_app = str(Path(__file__).with_name("bare_app.py"))
    bare = await res.spawn("bare", [bare_app, "--port", str(port)], emb_env, emb_dir)
    bare.url = f"http://127.0.0.1:{port}"
    api_a = await res.start_aigen("api", emb_env, emb_dir, label="api-embedded")
    api_b = await res.start_aigen("api", prod_env, prod_dir, label="api-production")
    await asyncio.gather(*(wait_http(p, timeout=120) for p in (bare, api_a, api_b)))
    databases = {"embedded": emb_db, "production": pg_db}
    urls = {"bare": bare.url, "embedded": api_a.url, "production": api_b.url}
    servers = {"bare": bare, "embedded": api_a, "production": api_b}
    assert all(urls.values())

    async def key_for(name: str) -> str | None:
        # A fresh key per run: the concurrency check counts the key's pending jobs, and
        # with no worker running they would otherwise pile up from run to run.
        if name == "bare":
            return None
        return (await customer(databases[name], res.secret)).key

    print(f"accept: warming up ({plan.warm_seconds:.0f} s each)", flush=True)
    for name, url in urls.items():
        await run_wrk(
            str(url),
            body=ACCEPT_BODY,
            key=await key_for(name),
            seconds=plan.warm_seconds,
            connections=plan.connections,
        )

    with RssPeak({"api (embedded)": api_a, "api (production)": api_b}) as rss:
        for round_ in range(plan.accept_rounds):
            results: dict[str, WrkResult] = {}
            for name, url in urls.items():
                key = await key_for(name)
                profiling = None
                if profile and round_ == 0 and name != "bare":
                    out = res.root / f"profile-accept-{name}.txt"
                    pid = api_a.pid if name == "embedded" else api_b.pid
                    profiling = asyncio.create_task(record(pid, plan.accept_seconds - 1, out))
                cpu_before = servers[name].cpu_seconds()
                result = await run_wrk(
                    str(url),
                    body=ACCEPT_BODY,
                    key=key,
                    seconds=plan.accept_seconds,
                    connections=plan.connections,
                )
                if result.requests:
                    cpu_ms = (servers[name].cpu_seconds() - cpu_before) * 1000 / result.requests
                    report.accept_cpu.setdefault(name, []).append(cpu_ms)
                if profiling is not None:
                    await profiling
                results[name] = result
                report.accept.setdefault(name, []).append(result)
                print(
                    f"accept round {round_ + 1} {name:10s} {result.rps:7.0f} req/s "
                    f"p50 {result.p50_ms:6.1f} ms p99 {result.p99_ms:6.1f} ms "
                    f"errors {result.errors}",
                    flush=True,
                )
            for name in ("embedded", "production"):
                ratio = results[name].rps / results["bare"].rps if results["bare"].rps else 0
                report.accept_ratio.setdefault(name, []).append(ratio)

        for name, url in urls.items():
            rate = 0.8 * statistics.median(r.rps for r in report.accept[name])
            result = await paced(str(url), name, rate, plan.paced_seconds, key_for)
            report.paced[name] = (rate, result)
            print(
                f"accept at 80 % {name:10s} target {rate:6.0f} got {result.rps:6.0f} req/s "
                f"p50 {result.p50_ms:6.1f} ms p99 {result.p99_ms:6.1f} ms",
                flush=True,
            )
    rss.into(report, "accept")
    await asyncio.gather(bare.stop(), api_a.stop(), api_b.stop())
    # The production API published an event for every job it accepted, and no worker
    # took them: the pipeline's worker must not start on that backlog (of jobs in
    # another database).
    await res.clear_rabbitmq()


async def paced(
    url: str,
    name: str,
    rate: float,
    seconds: float,
    key_for: Callable[[str], Awaitable[str | None]],
) -> WrkResult:
    """wrk held near `rate` req/s: every connection waits a random delay (mean `delay`)
    before each request. A connection whose answer is late sends its next request late,
    so the delay is first set from the target's own latency and then corrected, up to
    three runs, until the rate achieved is within 5 % of the rate asked for."""
    connections = max(4, math.ceil(rate / 10))  # about 10 requests/s each
    latency_ms = 1000 / (rate / 0.8)  # a first guess: the service time at full load
    result: WrkResult | None = None
    for _ in range(3):
        cycle_ms = connections / rate * 1000
        delay = max(1.0, cycle_ms - latency_ms)
        result = await run_wrk(
            url,
            body=ACCEPT_BODY,
            key=await key_for(name),
            seconds=seconds,
            connections=connections,
            delay_ms=delay,
        )
        if not result.rps or result.rps >= 0.95 * rate:
            break
        # Each connection's mean cycle was connections / rps; the rest of it is latency.
        latency_ms = connections / result.rps * 1000 - delay
        if latency_ms >= cycle_ms:
            connections = math.ceil(connections * latency_ms / cycle_ms * 1.2)
    assert result is not None
    return result


# Pipeline -------------------------------------------------------------------------------


PARTS = ("relay", "backend", "notifier", "worker", "api")
# A latency run at a rate derived from the maximum "holds" it when the webhooks arrive
# at this share of the rate offered, or faster.
HELD = 0.9

# What runs behind the workers; stopped while the workers alone drain a backlog.
DOWNSTREAM = ("relay", "backend", "notifier")


@dataclass
class Stack:
    name: str
    database_url: str
    env: dict[str, str]
    workdir: Path
    api: Proc
    procs: dict[str, Proc]


async def start_stack(res: Resources, plan: Plan, kind: str, log_level: str) -> Stack:
    workdir = res.folder(f"pipe-{kind}")
    concurrency = str(plan.worker_concurrency)
    if kind == "embedded":
        env = res.env(
            workdir, production=False, log_level=log_level, AIGEN_WORKER_CONCURRENCY=concurrency
        )
        up = await res.start_aigen("up", env, workdir)
        await wait_http(up, timeout=120)
        sqlite = f"sqlite+aiosqlite:///{workdir / 'aigen.db'}"
        return Stack(kind, sqlite, env, workdir, up, {"up": up})
    database_url = await res.postgres_database("pipe")
    await migrate(database_url)
    env = res.env(
        workdir,
        production=True,
        log_level=log_level,
        AIGEN_DATABASE_URL=database_url,
        AIGEN_WORKER_CONCURRENCY=concurrency,
    )
    procs = {part: await res.start_aigen(part, env, workdir) for part in PARTS}
    await wait_http(procs["api"], timeout=120)
    return Stack(kind, database_url, env, workdir, procs["api"], procs)


async def pipeline(
    res: Resources,
    plan: Plan,
    report: Report,
    kind: str,
    log_level: str,
    *,
    scale: bool,
    profile: bool,
) -> None:
    stack = await start_stack(res, plan, kind, log_level)
    receiver = Receiver()
    await receiver.start()
    assert stack.api.url is not None
    client = Client(stack.api.url)
    try:
        who = await customer(stack.database_url, res.secret)
        warm = await burst(
            client,
            body=job_body("bench-0ms", receiver.url, "warm"),
            key=who.key,
            count=20,
            concurrency=4,
        )
        if not await receiver.wait_for(set(warm.at), 120):
            raise RuntimeError(f"{kind}: warm-up jobs never arrived\n" + _tails(stack))
        await asyncio.sleep(1.0)
        report.idle_cpu[kind] = await idle_cpu(stack.procs, plan.idle_seconds)
        watched = {n: p for n, p in stack.procs.items() if n in ("api", "worker", "up")}
        with RssPeak(watched) as rss:
            # The most jobs/s at 0 ms, first: it decides the rate the latency runs can hold.
            postgres = kind == "production"
            db_before = await dbwork.reading(stack.database_url) if postgres else None
            meter = machine.CpuMeter(stack.procs)
            profiling = [
                asyncio.create_task(
                    record(
                        proc.pid, plan.saturate_seconds - 1, res.root / f"profile-{kind}-{n}.txt"
                    )
                )
                for n, proc in (stack.procs.items() if profile else [])
            ]
            sent = await saturate(
                client,
                receiver,
                body=job_body("bench-0ms", receiver.url, "max"),
                key=who.key,
                seconds=plan.saturate_seconds,
            )
            await asyncio.gather(*profiling)
            result = await end_to_end(receiver, sent, model_ms=0, timeout=plan.drain_seconds)
            # Posting has stopped and the pipeline has drained: all the CPU spent since
            # the start went into these jobs (and the parts' idle polling).
            done = [receiver.arrived[j] for j in sent.at if j in receiver.arrived]
            spent = meter.per_job(len(done))
            if db_before is not None:
                db_after = await dbwork.reading(stack.database_url, settle=True)
                report.db_work[kind] = dbwork.per_job(db_before, db_after, len(done))
            # Steady state: from the first webhook to the end of posting.
            most = window_rate(done, min(done, default=sent.last), sent.last)
            if not math.isfinite(most) or most <= 0:
                # Not one webhook before posting stopped: count the drain instead.
                most = steady_rate(done) if len(done) >= 10 else 0.0
            result.jobs_per_s = most
            label = f"{kind} 0 ms, max"
            report.cpu[label] = spent
            report.pipeline[label] = result
            _print_e2e(label, result)
            report.notes.append(
                f"{label}: 48 jobs kept in flight for {plan.saturate_seconds:.0f} s (a new "
                "POST per webhook); jobs/s = webhooks from the first one to the end of posting"
            )
            rate = plan.pipe_rate
            if not most >= plan.pipe_rate:
                rate = max(1.0, round(0.8 * most)) if math.isfinite(most) else 1.0
                report.notes.append(
                    f"{kind}: cannot hold {plan.pipe_rate:.0f} jobs/s, so the latency runs "
                    f"offer {rate:.0f} jobs/s (80 % of its maximum)"
                )
            runs = _latency_runs(rate)
            # Only the first run may step down, once; the rate is kept, held or not.
            may_step_down = rate != plan.pipe_rate
            while runs:
                model_ms, offered = runs.pop(0)
                meter = machine.CpuMeter(stack.procs)
                sent = await open_loop(
                    client,
                    body=job_body(f"bench-{model_ms}ms", receiver.url, "rate"),
                    key=who.key,
                    rate=offered,
                    seconds=plan.pipe_seconds,
                )
                result = await end_to_end(
                    receiver, sent, model_ms=model_ms, timeout=plan.drain_seconds
                )
                label = f"{kind} {model_ms} ms @ {offered:.0f}/s"
                held = result.jobs_per_s >= HELD * offered
                if may_step_down and not held and math.isfinite(result.jobs_per_s):
                    # 80 % of a maximum taken over seconds can be more than the machine
                    # gives in the minutes after; a latency behind a growing queue says
                    # nothing of the pipeline, so the runs start again once, lower.
                    may_step_down = False
                    rate = max(1.0, round(0.8 * result.jobs_per_s))
                    report.notes.append(
                        f"{kind}: held {result.jobs_per_s:.0f} of the {offered:.0f} jobs/s "
                        f"offered, so the latency runs offer {rate:.0f} jobs/s instead"
                    )
                    print(f"pipeline {label}: held {result.jobs_per_s:.0f} jobs/s; again lower")
                    runs = _latency_runs(rate)
                    continue
                may_step_down = False
                report.cpu[label] = meter.per_job(result.jobs - result.missing)
                report.pipeline[label] = result
                _print_e2e(label, result)
                if model_ms == 0:
                    report.legs[label] = legs(stack.workdir, sent, receiver.arrived)
        rss.into(report, kind)
        if scale:
            await workers_scale(res, plan, report, stack, client, receiver)
    finally:
        await client.aclose()
        await receiver.aclose()
        await asyncio.gather(*(p.stop() for p in stack.procs.values()))


def _latency_runs(rate: float) -> list[tuple[int, float]]:
    """(model ms, jobs/s) of the latency runs at `rate`. Near a saturated 2-core machine's
    maximum the legs mostly queue for the CPU; a run at half that rate shows better what
    the pipeline itself adds."""
    return [(0, rate), (200, rate), (0, max(1.0, round(rate / 2)))]


def _tails(stack: Stack) -> str:
    return "\n".join(f"--- {name}\n{proc.tail(1500)}" for name, proc in stack.procs.items())


def _print_e2e(label: str, r: EndToEnd) -> None:
    print(
        f"pipeline {label:28s} {r.jobs_per_s:6.0f} jobs/s  e2e p50 {r.p50_ms:7.1f} "
        f"p99 {r.p99_ms:7.1f} ms  overhead p50 {r.overhead_p50_ms:7.1f} "
        f"p99 {r.overhead_p99_ms:7.1f} ms  missing {r.missing} refused {r.refused} "
        f"{r.reasons or ''}",
        flush=True,
    )


# Worker scale ------------------------------------------------------------------------------

# Rounds of every slot in each backlog, the same for 1 and 2 workers. The slots of a worker
# start their 200 ms jobs together and end them together, so the rate between the 10th
# and the 90th percentile result measures a round's edges unless it spans many rounds
# (over 2 rounds two workers at 64 came out at 2.78 times one, above the ideal 2). And two
# worker processes make their first claims up to a second apart: one drains alone
# meanwhile, which the 10th percentile must be past. 32 rounds put it there for a gap of
# up to 6 rounds (about 1.3 s at 16 slots); 8 rounds, as until the fourteenth session,
# did not, and gave 1 worker at 16 slots 15 rounds (240 jobs) against 2 workers' 8.
SCALE_WAVES = 32


async def workers_scale(
    res: Resources, plan: Plan, report: Report, stack: Stack, client: Client, receiver: Receiver
) -> None:
    """Drain a backlog of 200 ms jobs with 1, then 2 worker processes of `c` slots each.

    The workers drain it alone: the relay, the backend and the notifier stop meanwhile
    (the workers publish their results, which wait in RabbitMQ), as on a deployment where
    the workers have machines of their own. On these 2 cores, the parts behind the
    workers would otherwise cap two workers at what the whole pipeline can do (the 0 ms
    maximum above), whatever the workers could. Once the workers are done, those parts
    start again and every webhook must arrive.
    """
    await stack.procs.pop("worker").stop()
    engine = create_engine(stack.database_url)
    sessionmaker = create_sessionmaker(engine)
    try:
        for concurrency in plan.scale_concurrency:
            for workers in (1, 2):
                count = max(40, SCALE_WAVES * workers * concurrency)
                who = await customer(stack.database_url, res.secret)
                sent = await burst(
                    client,
                    body=job_body("bench-200ms", receiver.url, "scale"),
                    key=who.key,
                    count=count,
                    concurrency=32,
                )
                await _relayed(sessionmaker)
                await asyncio.gather(*(stack.procs.pop(part).stop() for part in DOWNSTREAM))
                env = {**stack.env, "AIGEN_WORKER_CONCURRENCY": str(concurrency)}
                procs = [
                    await res.start_aigen("worker", env, stack.workdir, label=f"worker-{i}")
                    for i in range(workers)
                ]
                try:
                    await _announced(sessionmaker, who.account_id, count, plan.drain_seconds + 30)
                finally:
                    await asyncio.gather(*(p.stop() for p in procs))
                times = await _completed_at(sessionmaker, who.account_id)
                starts = [t for p in procs if (t := first_claim(p.log)) is not None]
                for part in DOWNSTREAM:
                    stack.procs[part] = await res.start_aigen(part, stack.env, stack.workdir)
                if not await receiver.wait_for(list(sent.at), plan.drain_seconds + 30):
                    raise RuntimeError("scale: webhooks missing after the drain\n" + _tails(stack))
                rate = steady_rate(times)
                report.scale[(concurrency, workers)] = rate
                print(
                    f"scale concurrency {concurrency:3d} workers {workers}: {rate:6.1f} jobs/s "
                    f"({len(times)} of {count} jobs; first claims "
                    f"{max(starts, default=0) - min(starts, default=0):.2f} s apart)",
                    flush=True,
                )
    finally:
        await engine.dispose()


async def _announced(
    sessionmaker: Sessionmaker, account_id: str, count: int, timeout: float
) -> None:
    """Until the workers have announced `count` results of the account (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(await _completed_at(sessionmaker, account_id)) >= count:
            return
        await asyncio.sleep(0.2)


async def _relayed(sessionmaker: Sessionmaker, timeout: float = 60) -> None:
    """Until every outbox row is published and stamped (the backlog is in RabbitMQ)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with sessionmaker() as session:
            left = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.sent_at.is_(None))
            )
        if not left:
            return
        await asyncio.sleep(0.2)


async def _completed_at(sessionmaker: Sessionmaker, account_id: str) -> list[float]:
    """When the worker announced each of the account's jobs done (its outbox row's time)."""
    async with sessionmaker() as session:
        rows = await session.scalars(
            select(OutboxMessage.created_at).where(
                OutboxMessage.account_id == account_id,
                OutboxMessage.type == "AIGenerationJobCompleted",
            )
        )
        return [value.timestamp() for value in rows]


# Output ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def render(report: Report) -> str:
    out: list[str] = []
    med = statistics.median
    if report.accept:
        rows = []
        for name, results in report.accept.items():
            ratios = report.accept_ratio.get(name)
            cpu = report.accept_cpu.get(name)
            rows.append(
                [
                    name,
                    f"{med(r.rps for r in results):.0f}",
                    f"{med(r.p50_ms for r in results):.1f}",
                    f"{med(r.p99_ms for r in results):.1f}",
                    f"{med(ratios):.0%}" if ratios else "100%",
                    f"{med(cpu):.2f}" if cpu else "",
                    str(sum(r.errors for r in results)),
                ]
            )
        out.append(
            "Accept path, POST /v1/generate, wrk -t1 -c"
            f"{report.plan.connections}, median of {report.plan.accept_rounds} alternating runs"
        )
        headers = ["target", "req/s", "p50 ms", "p99 ms", "vs bare", "server CPU ms/req", "errors"]
        out.append(table(headers, rows))
    if report.paced:
        rows = [
            [name, f"{rate:.0f}", f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}"]
            for name, (rate, r) in report.paced.items()
        ]
        out.append("\nAccept path at 80 % of each target's own maximum (paced wrk connections)")
        out.append(table(["target", "offered req/s", "got req/s", "p50 ms", "p99 ms"], rows))
    if report.pipeline:
        rows = [
            [
                label,
                f"{r.jobs_per_s:.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                f"{r.overhead_p50_ms:.1f}",
                f"{r.overhead_p99_ms:.1f}",
                f"{r.missing}/{r.refused}",
            ]
            for label, r in report.pipeline.items()
        ]
        out.append("\nPipeline, POST → webhook received (overhead = end to end − model time)")
        out.append(
            table(
                [
                    "stack, model, load",
                    "jobs/s",
                    "e2e p50",
                    "e2e p99",
                    "ovh p50",
                    "ovh p99",
                    "lost/refused",
                ],
                rows,
            )
        )
    if report.legs:
        labels = list(report.legs)
        rows = [
            [
                leg,
                *(
                    "{:.0f} / {:.0f}".format(*report.legs[label][leg])
                    if leg in report.legs[label]
                    else "-"
                    for label in labels
                ),
            ]
            for leg in LEGS
        ]
        out.append("\nWhere the time goes, ms p50 / p99 (from the JSON logs; 0 ms model)")
        out.append(table(["leg", *labels], rows))
    if report.cpu:
        out.append(
            "\nCPU ms per job: each run from its start to its drain, / jobs delivered; the aigen"
            " processes, then the services', the bench's own (load and webhook receiver), what"
            " none of them accounts for, and the machine's total (/proc/stat)"
        )
        out.append(_by_process(report.cpu, order=machine.COLUMNS, label="run"))
    if report.db_work:
        out.append("\nPostgreSQL's work per job, from its counters: the same run, / jobs delivered")
        out.append(_by_process(report.db_work))
    if report.idle_cpu:
        out.append("\nIdle CPU, % of a core, by process: no load, after the warm-up's jobs")
        out.append(_by_process(report.idle_cpu))
    if report.scale:
        rows = []
        for concurrency in sorted({c for c, _ in report.scale}):
            one = report.scale.get((concurrency, 1), float("nan"))
            two = report.scale.get((concurrency, 2), float("nan"))
            rows.append(
                [
                    str(concurrency),
                    f"{concurrency / 0.2:.0f}",
                    f"{one:.1f}",
                    f"{two:.1f}",
                    f"{two / one:.2f}x" if one else "-",
                ]
            )
        out.append(
            "\nWorkers at 200 ms model latency (production stack; the workers alone drain a "
            "backlog, the relay, backend and notifier stopped meanwhile)"
        )
        out.append(
            table(["concurrency", "ideal 1 worker", "1 worker", "2 workers", "2 vs 1"], rows)
        )
    if report.memory:
        rows = [
            [name, f"{idle:.0f}", f"{peak:.0f}"] for name, (idle, peak) in report.memory.items()
        ]
        out.append("\nResident size (VmRSS, MiB): idle after start-up, peak under load")
        out.append(table(["process", "idle", "peak"], rows))
    if report.libraries:
        out.append(
            "\nPython CPU by library, % of each process's py-spy samples (the deepest frame"
            " outside the standard library; python: the event loop and the rest of it)"
        )
        out.append(_libraries(report.libraries))
    if report.notes:
        out.append("")
        out.extend(f"- {note}" for note in report.notes)
    return "\n".join(out)


def _by_process(
    per_row: dict[str, dict[str, float]], *, order: Sequence[str] = (), label: str = "stack"
) -> str:
    """A table of one number per process, a row per stack or run (a stack lacks some
    processes); the names in `order` last, in that order, the others before them by name."""
    present = {name for per in per_row.values() for name in per}
    names = [*sorted(present - set(order)), *(name for name in order if name in present)]
    rows = [
        [row, *(f"{per[n]:.1f}" if n in per else "" for n in names)] for row, per in per_row.items()
    ]
    return table([label, *names], rows)


def _libraries(per_process: dict[str, dict[str, float]], rows: int = 12) -> str:
    """A row per library (the largest in any process first), a column per process; the
    libraries past `rows` summed into "the rest"."""
    largest: dict[str, float] = {}
    for shares in per_process.values():
        for name, share in shares.items():
            largest[name] = max(largest.get(name, 0.0), share)
    shown = sorted(largest, key=lambda name: -largest[name])[:rows]
    names = list(per_process)
    body = [
        [library, *(f"{100 * per_process[n].get(library, 0.0):.0f}" for n in names)]
        for library in shown
    ]
    rest = [
        f"{100 * (1 - sum(per_process[n].get(library, 0.0) for library in shown)):.0f}"
        for n in names
    ]
    return table(["library", *names], [*body, ["the rest", *rest]])


# Entry point -------------------------------------------------------------------------------


async def main_async(options: argparse.Namespace) -> Report:
    plan = QUICK if options.quick else FULL
    report = Report(plan)
    res = Resources(keep=options.keep or options.profile)
    print(f"bench: working in {res.root}", flush=True)
    # SIGTERM (a `timeout`, a CI limit) cancels the run, so the `finally` below still
    # stops every process and drops every database, queue and key (SIGINT already does).
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    sections = options.only or list(SECTIONS)
    try:
        async with asyncio.timeout(options.timeout):
            if "accept" in sections:
                await accept(res, plan, report, options.log_level, profile=options.profile)
            if "pipeline" in sections or "scale" in sections:
                if "pipeline" in sections:
                    await pipeline(
                        res,
                        plan,
                        report,
                        "embedded",
                        options.log_level,
                        scale=False,
                        profile=options.profile,
                    )
                await pipeline(
                    res,
                    plan,
                    report,
                    "production",
                    options.log_level,
                    scale="scale" in sections,
                    profile=options.profile,
                )
    finally:
        await res.aclose()
    report.notes.extend(v.note() for v in res.vacuums)
    for path in sorted(res.root.glob("profile-*.txt")) if options.profile else []:
        report.libraries[path.stem.removeprefix("profile-")] = libraries(path)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 4 minutes)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these")
    parser.add_argument("--log-level", default="info", help="AIGEN_LOG_LEVEL of every process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the aigen processes (implies --keep)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="abort after this long")
    options = parser.parse_args(argv)
    started = time.monotonic()
    report = asyncio.run(main_async(options))
    print()
    print(render(report))
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    if options.json:
        data = asdict(report)
        data["scale"] = {f"{c}x{w}": v for (c, w), v in report.scale.items()}
        options.json.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
