"""Consumers' inbox rows keyed by random event ids (uuid4, before) against time-ordered
ones (`aigen.ids.new_event_id`, UUID version 7), side by side on a large inbox.

    python -m bench.keys [--rows 3000000] [--rounds 4] [--statements 750]

Two databases migrated as aigen's own, each with `--rows` inbox rows of its kind of id
(written by COPY, then vacuumed and analyzed); then alternating rounds of the consumers'
own statement (`bus.inbox.first_time_many`, 32 events at a time, as a batch of the
group commit), each round after a CHECKPOINT. Printed per round: the time per statement
and the WAL written per row. After a checkpoint the first change to a page writes the
whole page to the WAL: random keys change pages all over an index larger than the
server's buffers, time-ordered ones the few at its end. The databases are dropped at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.fixtures import scratch

from aigen.bus import inbox
from aigen.clock import utcnow
from aigen.db.migrate import upgrade
from aigen.db.session import create_engine, create_sessionmaker, unit_of_work
from aigen.ids import new_event_id

from .infra import POSTGRES_URL

KINDS: dict[str, Callable[[], str]] = {
    "random (uuid4)": lambda: uuid.uuid4().hex,
    "time-ordered (v7)": new_event_id,
}
CONSUMERS = ("backend", "notifications", "workflow")
BATCH = 32
COPY_CHUNK = 300_000


async def _fill(engine: AsyncEngine, make: Callable[[], str], rows: int) -> str:
    """`rows` inbox rows (a third per consumer) by COPY; the key index's size."""
    now = utcnow()
    async with engine.connect() as connection:
        raw: Any = (await connection.get_raw_connection()).driver_connection
        for start in range(0, rows, COPY_CHUNK):
            count = min(COPY_CHUNK, rows - start) // len(CONSUMERS)
            records = [(c, make(), now) for _ in range(count) for c in CONSUMERS]
            await raw.copy_records_to_table("inbox_messages", records=records)
        await raw.execute("VACUUM ANALYZE inbox_messages")
        size: str = await raw.fetchval(
            "SELECT pg_size_pretty(pg_relation_size('pk_inbox_messages'))"
        )
        return size


async def _round(
    engine: AsyncEngine, make: Callable[[], str], statements: int
) -> tuple[float, float]:
    """ms per statement and WAL bytes per row of `statements` batches after a CHECKPOINT."""
    async with engine.connect() as connection:
        await connection.execute(text("CHECKPOINT"))
        await connection.commit()
        before = (await connection.execute(text("SELECT pg_current_wal_lsn()"))).scalar()
        await connection.commit()
    sessionmaker = create_sessionmaker(engine)
    started = time.perf_counter()
    for _ in range(statements):
        async with unit_of_work(sessionmaker) as session:
            await inbox.first_time_many(session, "backend", [make() for _ in range(BATCH)])
    elapsed = time.perf_counter() - started
    async with engine.connect() as connection:
        wal = (
            await connection.execute(
                text("SELECT pg_current_wal_lsn() - CAST(:before AS pg_lsn)"), {"before": before}
            )
        ).scalar()
    return elapsed * 1000 / statements, float(str(wal)) / (statements * BATCH)


async def main(rows: int, rounds: int, statements: int) -> None:
    tag = secrets.token_hex(4)
    names = {kind: f"aigen_bench_{tag}_keys_{n}" for n, kind in enumerate(KINDS)}
    engines: dict[str, AsyncEngine] = {}
    try:
        for kind, name in names.items():
            url = await scratch.create_database(POSTGRES_URL, name)
            engines[kind] = create_engine(url, pool_size=2)
            await upgrade(engines[kind])
            size = await _fill(engines[kind], KINDS[kind], rows)
            print(f"{kind}: {rows} rows, key index {size}", flush=True)
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
        for number in range(rounds):
            for kind in KINDS:  # alternating, so that a noisy moment falls on both
                results[kind].append(await _round(engines[kind], KINDS[kind], statements))
                ms, wal = results[kind][-1]
                print(f"round {number + 1} {kind:18} {ms:6.2f} ms/statement {wal:6.0f} B WAL/row")
        _report(results)
    finally:
        for engine in engines.values():
            await engine.dispose()
        for name in names.values():
            await scratch.drop_database(POSTGRES_URL, name)


def _report(results: dict[str, list[tuple[float, float]]]) -> None:
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    rows = {k: (median([m for m, _ in v]), median([w for _, w in v])) for k, v in results.items()}
    (random_ms, random_wal), (ordered_ms, ordered_wal) = rows.values()
    print(f"\nInbox inserts, {BATCH} events a statement, median of the rounds")
    print("| event ids | ms per statement | WAL bytes per row |")
    print("|---|---|---|")
    for kind, (ms, wal) in rows.items():
        print(f"| {kind} | {ms:.2f} | {wal:.0f} |")
    ratio_ms, ratio_wal = ordered_ms / random_ms, ordered_wal / random_wal
    print(f"| time-ordered vs random | {ratio_ms:.2f}x | {ratio_wal:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--statements", type=int, default=750)
    options = parser.parse_args()
    asyncio.run(main(options.rows, options.rounds, options.statements))
