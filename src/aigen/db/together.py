"""Writes sent together: one statement on PostgreSQL.

The API's intake writes four tables for a batch of jobs (the jobs, their events, the
ledger's holds, the balances), each a multi-row statement of its own: four round trips
of a transaction that holds the account's lock, and while it waits for each answer the
API's loop serves the next requests, so under load each round trip waited for them too.
Measured at 80 % of the accept path's maximum, the intake's transaction took about 10 ms
for a batch of 12 jobs, most of it in the loop between its eight round trips
(BENCHMARKS.md, the eighteenth session).

`write` sends such writes as one statement on PostgreSQL: each becomes a data-modifying
CTE whose rows come from `unnest` of one array per column, so that one statement (and one
prepared statement on the server) serves every batch size. On SQLite, whose calls are
not round trips, they run one after another, as before. On PostgreSQL they run on one
snapshot: a foreign key from one write's rows to another's holds (it is checked at the
end of the statement), but an UPDATE or DELETE does not see the rows that another write
of the same call inserts or changes, so it must not be meant for them.

A write is a statement and its rows (the driver's `executemany` shape):
- a plain `insert(table)`, the rows naming the same columns, among them every column
  with a Python-side default (the execution context that computes those is skipped);
- an UPDATE or DELETE whose bound parameters take the rows' values (a value the
  statement gives itself, `status = 'pending'`, stays its own). Each row must name rows
  of its own: PostgreSQL's `UPDATE … FROM` changes a row once, whichever match it takes
  (`billing.holding` sums an account's holds first, for this). The last write may have
  a RETURNING, whose rows `write_rows` gives back (the notifier's record of its
  attempts: the deliveries it settled).

`write_after` sends writes after a statement that returns what it acted on, made only if
it acted: on PostgreSQL the writes' rows are taken only where the statement returned a
row, in the same statement (the backend's settlement of a result that comes alone: the
job's transition, then its inbox row, assets, ledger rows and balance). `write_if` is
its case of one write after a statement that returns a row when it acts (the worker's
announcement: its inbox row made now, then its event).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Executable, Select, Table, func, insert, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.expression import bindparam

from . import driver
from .session import is_postgres

Statement = Insert | Update | Delete
Write = tuple[Statement, Sequence[Mapping[str, Any]]]
# (statement, the rows' keys) of each write, in order: what one combined statement is for.
_Shape = tuple[tuple[Statement, tuple[str, ...]], ...]


async def write(session: AsyncSession, writes: Sequence[Write]) -> int:
    """Run `writes` (those with rows) in the session's transaction, in one statement on
    PostgreSQL, one after another elsewhere; returns how many rows the last one changed
    (-1 when the driver does not say: a last write of several rows run on its own, as
    the driver's `executemany`)."""
    return (await write_rows(session, writes)).rowcount


async def write_rows(
    session: AsyncSession, writes: Sequence[Write], *, alone: bool = False
) -> driver.Rows:
    """`write`, with the rows that the last write returns, if it has a RETURNING (the
    others' are not seen). `alone`: the writes may commit by themselves
    (`driver.execute`), when they are all the caller's unit must commit together."""
    writes = [(statement, rows) for statement, rows in writes if rows]
    if not writes:
        return driver.Rows([], 0)
    if len(writes) > 1 or writes[-1][0]._returning:
        # Built (and checked) on every database, so that SQLite's tests see a misuse too.
        combined = _combined(_shape(writes))
        if is_postgres(session):
            # (One statement from arrays: a list of rows with RETURNING would not be the
            # driver's `executemany`.)
            return await driver.execute(
                session, combined, _arrays([r for _, r in writes]), alone=alone
            )
    found = driver.Rows([], 0)
    for statement, rows in writes:
        found = await driver.execute(session, statement, list(rows), alone=alone)
    return found


async def write_if(
    session: AsyncSession,
    first: Executable,
    params: Mapping[str, Any],
    then: Write,
    *,
    alone: bool = False,
) -> bool:
    """`first`, a statement that returns a row when it acts (an `INSERT … SELECT … ON
    CONFLICT DO NOTHING RETURNING` of bound parameters, say: `inbox.Condition`'s), run
    with `params`; and `then`'s rows written only if it did. Returns whether it did
    (`write_after`, whose one statement this is on PostgreSQL)."""
    return bool((await write_after(session, first, params, [then], alone=alone)).rows)


async def write_after(
    session: AsyncSession,
    first: Executable,
    params: Mapping[str, Any],
    then: Sequence[Write],
    *,
    alone: bool = False,
) -> driver.Rows:
    """`first`, a statement that returns the rows it acted on (`… RETURNING`), run with
    `params`; and `then`'s writes (those with rows) made only if it returned any.
    Returns `first`'s rows.

    On PostgreSQL they are one statement: `first` a data-modifying CTE, each write
    another whose rows are taken only while the first CTE returned one (the CTEs see
    each other's RETURNING, not each other's rows in the tables), and `first`'s rows
    selected. So they are one round trip, atomic on their own, and with `alone`
    (`driver.execute`) may commit by themselves. Elsewhere, one after the other."""
    writes = [(statement, rows) for statement, rows in then if rows]
    if writes and is_postgres(session):
        combined = _after(first, _shape(writes))
        return await driver.execute(
            session, combined, {**params, **_arrays([r for _, r in writes])}, alone=alone
        )
    acted = await driver.execute(session, first, params, alone=alone)
    if acted.rows and writes:
        await write(session, writes)
    return acted


@functools.lru_cache(maxsize=16)
def _after(first: Executable, shape: _Shape) -> Select[Any]:
    """`write_after`'s one statement, built once per `first` and shape of the writes."""
    acted, acting = _acting(first)
    writes = [
        _from_arrays(number, statement, keys, only_if=acting).cte(f"w{number}")
        for number, (statement, keys) in enumerate(shape)
    ]
    return select(*acted.c).add_cte(*writes)


async def rows_if(
    session: AsyncSession,
    first: Executable,
    params: Mapping[str, Any],
    then: Callable[[ColumnElement[bool]], Executable],
    rows: Sequence[Mapping[str, Any]],
    *,
    alone: bool = False,
) -> driver.Rows:
    """`first`, a statement that returns a row when it acts, run with `params`; and an
    `INSERT … SELECT … RETURNING` of `rows` (`then(acting)`: its SELECT over
    `rows_of_arrays`, with `acting` among its conditions) that takes them only if it
    did, as one statement (PostgreSQL's data-modifying CTEs, as `write_after`). Returns
    the insert's rows. `alone`: the statement may commit by itself (`driver.execute`).

    For an insert that `write_after`'s plain writes cannot be: one that skips the rows
    already there and says which it made (the notifier's deliveries of an event that
    comes alone, after its inbox row)."""
    if not is_postgres(session):
        raise ValueError("rows_if is one statement of data-modifying CTEs: PostgreSQL only")
    statement = _first_then(first, then)
    return await driver.execute(session, statement, {**params, **_arrays([rows])}, alone=alone)


@functools.lru_cache(maxsize=16)
def _first_then(
    first: Executable, then: Callable[[ColumnElement[bool]], Executable]
) -> Select[Any]:
    """`rows_if`'s one statement, built once per pair."""
    made = cast(Any, then(_acting(first)[1])).cte("w_then")
    return select(*made.c)


def _acting(first: Executable) -> tuple[Any, ColumnElement[bool]]:
    """`first` as the CTE `w_first`, and the condition that it returned a row."""
    acted = cast(Any, first).cte("w_first")
    return acted, select(literal_column("1")).select_from(acted).exists()


def rows_of_arrays(table: Table, keys: Sequence[str]) -> Select[Any]:
    """`SELECT` of a row per element of one array per column (`unnest`, PostgreSQL), for
    a multi-row `INSERT … SELECT … RETURNING` that `insert_rows` runs.

    A list of rows with `RETURNING` is left to SQLAlchemy's execution (`db.driver`),
    which renders one multi-row statement a call: through the session, at about twice
    the CPU of the driver. One set of parameters of arrays runs on the driver, as one
    prepared statement for every number of rows."""
    rows = _unnest(0, {key: table.c[key].type for key in keys})
    return select(*(rows.c[key] for key in keys))


async def insert_rows(
    session: AsyncSession,
    one_by_one: Mapping[bool, Any],
    from_arrays: Any,
    rows: Sequence[Mapping[str, Any]],
) -> driver.Rows:
    """`rows` (all naming the same keys) by an `INSERT … RETURNING` built both ways: on
    PostgreSQL several rows go as `from_arrays`, its `INSERT … SELECT` over
    `rows_of_arrays`, one statement on the driver; otherwise as the list of them, by
    `one_by_one`'s statement for the database (keyed as `db.base.insert_or_skip`'s)."""
    postgres = is_postgres(session)
    if postgres and len(rows) > 1:
        return await driver.execute(session, from_arrays, _arrays([rows]))
    return await driver.execute(session, one_by_one[postgres], list(rows))


def _array(number: int, key: str) -> str:
    return f"w{number}_{key}"


def _shape(writes: Sequence[Write]) -> _Shape:
    """Each write's statement and its rows' keys: what one combined statement is built for."""
    return tuple((statement, tuple(rows[0])) for statement, rows in writes)


def _arrays(rows_each: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, list[Any]]:
    """The parameters of statements from arrays: of the `number`th one's rows, one array
    per key, named `w<number>_<key>` (`_unnest`)."""
    return {
        _array(number, key): [row[key] for row in rows]
        for number, rows in enumerate(rows_each)
        for key in rows[0]
    }


@functools.lru_cache(maxsize=64)
def _combined(shape: _Shape) -> Statement:
    """The writes as one statement: all but the last as CTEs of the last. Built once per
    shape (few: the hot callers' writes, with or without the ones that had no rows)."""
    parts = [_from_arrays(n, statement, keys) for n, (statement, keys) in enumerate(shape)]
    *before, last = parts
    return last.add_cte(*(part.cte(f"w{number}") for number, part in enumerate(before)))


def _from_arrays(
    number: int,
    statement: Statement,
    keys: tuple[str, ...],
    *,
    only_if: ColumnElement[bool] | None = None,
) -> Statement:
    """`statement` for a row per element of arrays named `w<number>_<key>`; `only_if`: a
    condition that every row also needs."""
    if isinstance(statement, Insert):
        table = statement.table
        _check_plain_insert(statement, keys)
        rows = _unnest(number, {key: table.c[key].type for key in keys})
        values = select(*(rows.c[key] for key in keys))
        if only_if is not None:
            values = values.where(only_if)
        return insert(table).from_select(list(keys), values, include_defaults=False)
    binds: dict[str, BindParameter[Any]] = {}

    def found(bind: BindParameter[Any]) -> None:
        # (An anonymous one holds a value the statement gives itself: `status = 'pending'`.)
        if not bind.unique:
            binds.setdefault(bind.key, bind)

    visitors.traverse(statement, {}, {"bindparam": found})
    if set(binds) != set(keys):
        raise ValueError(f"the rows give {sorted(keys)}, the statement takes {sorted(binds)}")
    rows = _unnest(number, {key: _type_of(statement, binds[key]) for key in keys})

    def column(element: Any, **_: Any) -> ColumnElement[Any] | None:
        # A bound parameter of the statement becomes the column of the row it comes from.
        if isinstance(element, BindParameter) and element.key in binds:
            found: ColumnElement[Any] = rows.c[element.key]
            return found
        return None

    replaced = visitors.replacement_traverse(statement, {}, column)
    assert isinstance(replaced, Update | Delete)
    return replaced.where(only_if) if only_if is not None else replaced


def _type_of(statement: Statement, bind: BindParameter[Any]) -> Any:
    """The bound parameter's type, for its array; `values(column=bindparam(…))` leaves it
    untyped, and its column says."""
    if not bind.type._isnull:
        return bind.type
    table = statement.table
    for column, value in (getattr(statement, "_values", None) or {}).items():
        if value is bind:
            return table.c[column if isinstance(column, str) else column.key].type
    raise ValueError(f"give the parameter {bind.key!r} a type: its array needs one")


def _unnest(number: int, types: Mapping[str, Any]) -> Any:
    """`unnest($1::type[], …) AS v<number>(key, …)`: a row per element of the arrays."""
    arrays = [bindparam(_array(number, key), type_=_one_level(kind)) for key, kind in types.items()]
    return func.unnest(*arrays).table_valued(*types).render_derived(name=f"v{number}")


def _check_plain_insert(statement: Insert, keys: tuple[str, ...]) -> None:
    if statement._values or statement._multi_values or statement._returning:
        raise ValueError("a write's INSERT takes its values from its rows alone")
    missing = [
        column.key
        for column in statement.table.columns
        if column.default is not None and not column.default.is_sequence and column.key not in keys
    ]
    if missing:
        raise ValueError(f"give the Python-side defaults of {missing}: they are not computed here")


def _one_level(kind: Any) -> ARRAY[Any]:
    # One dimension: a JSON value that is itself a list (`["a"]`) is one element, given to
    # the item type's processor whole, not an array of its own.
    return ARRAY(kind, dimensions=1)
