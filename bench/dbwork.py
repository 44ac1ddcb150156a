"""What PostgreSQL did per job, from its own counters (`pg_stat_database`).

The CPU times beside it move by a fifth or more between runs on these shared machines;
the transactions and rows a job takes do not, so a change that saves statements shows
here in a single run. A server process reports its counts when a transaction ends, but
at most once a second, and an idle one within 10 s (PostgreSQL 15's cumulative
statistics), hence the wait before the second reading.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from aigen.db.session import create_engine

COUNTERS = {
    "transactions": "xact_commit + xact_rollback",
    "rows inserted": "tup_inserted",
    "rows updated": "tup_updated",
    "rows deleted": "tup_deleted",
}
# PostgreSQL's PGSTAT_IDLE_INTERVAL (10 s), and a margin.
SETTLE_SECONDS = 11.0


async def reading(database_url: str, *, settle: bool = False) -> dict[str, int]:
    """The database's counters now; `settle`: first wait until every server process has
    reported what it did."""
    if settle:
        await asyncio.sleep(SETTLE_SECONDS)
    columns = ", ".join(f"{expression} AS c{i}" for i, expression in enumerate(COUNTERS.values()))
    query = text(f"SELECT {columns} FROM pg_stat_database WHERE datname = current_database()")
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(query)).one()
    finally:
        await engine.dispose()
    return {name: int(value) for name, value in zip(COUNTERS, row, strict=True)}


def per_job(before: dict[str, int], after: dict[str, int], jobs: int) -> dict[str, float]:
    return {name: (after[name] - before[name]) / max(1, jobs) for name in COUNTERS}
