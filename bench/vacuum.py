"""Autovacuum's work, done by the bench where the server does not do it.

PostgreSQL vacuums and analyzes a table once enough of its rows have changed
(autovacuum, on by default). The machines these benchmarks run on turn it off (a CI
setting, `autovacuum = off`, for the tests' speed). Without it a table's statistics stay
those of a table that was never analyzed, and the plans PostgreSQL keeps for the
prepared statements every aigen process runs (generic plans, after a statement's fifth
run) stay the plans it made while the tables were nearly empty: sequential scans, which
read every row the database gained since. The dead rows of every update stay in the
tables and their indexes as well. A run's cost per job then grows with the jobs its
database holds, which no server with autovacuum on shows: in the nineteenth session's
runs the production stack at 100 jobs/s, after its 20 s at the maximum, spent about a
fifth more CPU per job than with this module's work done (BENCHMARKS.md).

So when `SHOW autovacuum` is off, `Autovacuum` does what it would: a table is analyzed
once 50 rows plus 10 % of it changed since it last was, and vacuumed once 50 rows plus
20 % of it are dead (autovacuum's default thresholds), checked every `NAPTIME` seconds.
Autovacuum's own default is a minute, for databases that live months; the bench's live
minutes, from empty. Its VACUUMs are throttled as autovacuum's are (a 2 ms sleep per
200 units of cost), and its work runs in PostgreSQL, so its CPU counts in PostgreSQL's
share of a job, as autovacuum's would.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.db.migrate import autovacuum_off
from aigen.db.session import create_engine

NAPTIME = 5.0

# Autovacuum's default thresholds (autovacuum_{analyze,vacuum}_{threshold,scale_factor}).
_DUE = text(
    """
    SELECT s.relname,
           s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0) AS vacuum,
           s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0) AS analyze
      FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    """
)


async def needed(database_url: str) -> bool:
    """Whether the server of `database_url` runs without autovacuum (what `aigen
    migrate` warns of)."""
    engine = create_engine(database_url)
    try:
        return await autovacuum_off(engine)
    finally:
        await engine.dispose()


@dataclass
class Autovacuum:
    """Autovacuum's rounds over one database, from `start` to `stop`."""

    database_url: str
    vacuumed: int = 0
    analyzed: int = 0
    # Why the rounds stopped early, if they did (the report says so).
    failed: str | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        engine = create_engine(self.database_url)
        try:
            while True:
                await asyncio.sleep(NAPTIME)
                await self._round(engine)
        except Exception as exc:  # reported with the results, not raised
            self.failed = repr(exc)
        finally:
            await engine.dispose()

    async def _round(self, engine: AsyncEngine) -> None:
        async with engine.connect() as connection:
            # VACUUM cannot run inside a transaction block.
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            # Throttled as autovacuum is (autovacuum_vacuum_cost_delay); a VACUUM run by
            # hand is not, and would take the CPU from the jobs in bursts.
            await connection.execute(text("SET vacuum_cost_delay = '2ms'"))
            for table, vacuum, analyze in (await connection.execute(_DUE)).all():
                if vacuum:
                    await connection.execute(text(f'VACUUM (ANALYZE) "{table}"'))
                    self.vacuumed += 1
                    self.analyzed += 1
                elif analyze:
                    await connection.execute(text(f'ANALYZE "{table}"'))
                    self.analyzed += 1

    def note(self) -> str:
        name = self.database_url.rsplit("/", 1)[-1]
        done = f"vacuumed {self.vacuumed} and analyzed {self.analyzed} tables"
        failed = f"; its rounds stopped: {self.failed}" if self.failed else ""
        return (
            f"PostgreSQL's autovacuum is off on this server: the bench did its work on "
            f"{name} (bench/vacuum.py, every {NAPTIME:.0f} s): {done}{failed}"
        )
