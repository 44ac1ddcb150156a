"""The hot statements straight to the database's driver, compiled once by SQLAlchemy.

Through the session a statement costs about twice its round trip in Python: SQLAlchemy's
execution context, its adapter's cursor and its result objects took 190 µs a statement
on the bench machine, against about 90 for asyncpg alone (BENCHMARKS.md, the sixteenth
session). So `execute` runs a Core statement on the session's own driver connection,
inside the session's transaction: SQLAlchemy compiles the statement once per statement
object and set of parameter names (the SQL, the order of its parameters, their types'
processors), and each call only converts the values and makes the driver's call. The
statements stay written once, in SQLAlchemy, for both databases. The drivers are
asyncpg, and on SQLite this project's loop connection (`db.sqlite`); for any other,
`execute` is `session.execute`.

Covered: a Core statement (INSERT, UPDATE, DELETE, SELECT) built once, run with one set
of parameters, or with a list of them when it returns no rows (the driver's
`executemany`), and on SQLite a list with RETURNING too. Left to SQLAlchemy: on
PostgreSQL a list with RETURNING (its "insertmanyvalues" renders one multi-row statement,
one round trip), an ORM statement (it makes entities; `db.base.
as_loaded` makes them from Core rows), and statements whose columns take Python-side
defaults or `onupdate` values (the execution context computes those: give them).

What SQLAlchemy's execution does around a statement still happens: its cursor events
fire (with no cursor or execution context, as its documentation allows), and errors come
back as its own, translated the same way, the connection invalidated when it is gone, so
that `db.errors.unreachable` and every caller see no difference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from sqlalchemy import exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import ExpandedState, SQLCompiler
from sqlalchemy.types import TupleType

from . import sqlite

Params = Mapping[str, Any]
_Processor = Callable[[Any], Any] | None
# A positional parameter: its name, its type's processor, its value when the statement
# itself gives one (a literal bound in the expression, `v + 1`), whether it is required.
_Bind = tuple[str, _Processor, Any, bool]
# An expanded `IN`'s SQL and, per placeholder, its parameter and the list's index (or -1).
_Expansion = tuple[str, tuple[tuple[_Bind, int], ...]]
# Expansions kept per plan: one per list length seen, a batch's size at most.
_EXPANSIONS = 256
# session.info: the transaction that `_driver` found the connection for, and it.
_DRIVER = "aigen.driver"
# session.info: the transaction holds one unit of work (`db.session.unit_of_work`), so
# its statements may commit by themselves where their caller allows it (`execute`).
ALONE = "aigen.driver.alone"
# (dialect, driver) of the engines this runs past SQLAlchemy: asyncpg, and SQLite through
# this project's loop connection (`db.sqlite`, under SQLAlchemy's aiosqlite dialect).
_DRIVERS = {("postgresql", "asyncpg"), ("sqlite", "aiosqlite")}


@dataclass(slots=True)
class Rows:
    """A statement's rows (as tuples, by `keys`) and how many rows it changed or gave
    (-1: not known, after a list of parameters); the part of SQLAlchemy's `Result` that
    the callers use, the same on both paths."""

    rows: list[tuple[Any, ...]]
    rowcount: int
    keys: tuple[str, ...] = ()

    def all(self) -> list[tuple[Any, ...]]:
        return self.rows

    def mappings(self) -> list[dict[str, Any]]:
        return [dict(zip(self.keys, row, strict=True)) for row in self.rows]

    def one_or_none(self) -> tuple[Any, ...] | None:
        if len(self.rows) > 1:
            raise exc.MultipleResultsFound("more than one row, where one at most was expected")
        return self.rows[0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.rows]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


async def execute(
    session: AsyncSession,
    statement: Executable,
    params: Params | Sequence[Params],
    *,
    alone: bool = False,
) -> Rows:
    """Run `statement` in the session's transaction (see the module's note).

    `alone`: the caller accepts that the statement commits by itself, whatever follows
    it. It then does so in a transaction that holds one unit of work (`ALONE`, set by
    `unit_of_work(..., alone=True)` and `db.group`) on asyncpg, until the unit sends a
    statement that is not `alone`: sent outside a transaction, as one round trip, not
    BEGIN, the statement and COMMIT (the worker's claim is most often a transaction of
    that one statement). The first statement that is not `alone` begins the transaction,
    and what the unit sends after it runs in it, `alone` or not. Elsewhere every
    statement runs in the transaction as any other.

    A read sent `alone` that locks nothing gets the rows it would get in the
    transaction: under READ COMMITTED each statement reads its own snapshot (the
    backend's settlement of a result alone: a read of the job, then one statement that
    commits by itself)."""
    dialect = session.get_bind().dialect
    rows: Sequence[Params] = [params] if isinstance(params, Mapping) else params
    alone = alone and bool(session.info.get(ALONE, False))
    if rows and (dialect.name, dialect.driver) in _DRIVERS:
        # A list of one is the same statement with its one set of parameters.
        many = len(rows) > 1
        plan = _plan(statement, tuple(rows[0]), dialect, many)
        if plan is not None and not (many and plan.expanding):
            on = await _driver(session, alone=alone)
            if on is not None and not (many and plan.returns_rows and not on[1].row_by_row):
                return await plan.run(*on, rows)
    result = await session.execute(statement, params)
    # (Only a statement's cursor result can have no rows; the ORM's results have rows.)
    if not getattr(result, "returns_rows", True):
        return Rows([], getattr(result, "rowcount", -1))
    found = [tuple(row) for row in result.all()]
    return Rows(found, len(found), tuple(result.keys()))


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    binds: tuple[_Bind, ...]
    expanding: bool
    compiled: SQLCompiler
    returns_rows: bool
    results: tuple[_Processor, ...]
    keys: tuple[str, ...]
    # The list parameters of an `IN`, and whether their expansion is kept per lengths
    # (not for a tuple `IN` or a value rendered into the SQL: those vary with the values).
    lists: tuple[str, ...] = ()
    by_length: bool = False
    expansions: dict[tuple[int, ...], _Expansion] = field(default_factory=dict)

    def values(self, params: Params) -> tuple[list[Any], str]:
        if self.expanding:
            return self._expanded(params)
        return [_value(bind, params) for bind in self.binds], self.sql

    def _expanded(self, params: Params) -> tuple[list[Any], str]:
        """An `IN` over a list: its placeholders depend on the list's length, so the SQL
        and the order of the values are kept per set of lengths (SQLAlchemy's expansion,
        made once for each, cost 2–2.5 % of a process when made at every call)."""
        lengths = None
        if self.by_length and all(isinstance(params.get(n), list | tuple) for n in self.lists):
            lengths = tuple(len(params[name]) for name in self.lists)
        expansion = self.expansions.get(lengths) if lengths is not None else None
        if expansion is None:
            state = self.compiled.construct_expanded_state(params, escape_names=False)
            processors = state.processors
            values = state.parameters
            assert state.positiontup is not None
            if lengths is not None and len(self.expansions) < _EXPANSIONS:
                self.expansions[lengths] = self._expansion(state)
            return [
                processors[name](values[name]) if name in processors else values[name]
                for name in state.positiontup
            ], state.statement
        sql, places = expansion
        out = []
        for bind, index in places:
            if index < 0:
                out.append(_value(bind, params))
            else:
                name, processor, _, _ = bind
                value = params[name][index]
                out.append(processor(value) if processor is not None else value)
        return out, sql

    def _expansion(self, state: ExpandedState) -> _Expansion:
        # Each placeholder of the expanded SQL: a plain parameter (index -1), or the
        # index-th item of a list parameter, with the list's type processor.
        binds = {bind[0]: bind for bind in self.binds}
        items = {
            item: (name, index)
            for name, expanded in state.parameter_expansion.items()
            for index, item in enumerate(expanded)
        }
        assert state.positiontup is not None
        places = []
        for item in state.positiontup:
            name, index = items.get(item, (item, -1))
            places.append((binds[name], index))
        return state.statement, tuple(places)

    async def run(
        self, connection: AsyncConnection, driver: _Runner, rows: Sequence[Params]
    ) -> Rows:
        many = len(rows) != 1
        if many:
            sql, values = self.sql, [self.values(row)[0] for row in rows]
        else:
            values, sql = self.values(rows[0])
        # SQLAlchemy's cursor events, for whoever watches them (tracing, the tests'
        # statement counts), with no cursor or execution context, as its docs allow.
        sync = connection.sync_connection
        events = sync.dispatch if sync is not None else None
        if events is not None and events.before_cursor_execute:
            events.before_cursor_execute(sync, None, sql, values, None, many)
        found: list[tuple[Any, ...]] = []
        try:
            if many and not self.returns_rows:
                await driver.executemany(sql, values)
                count = -1
            elif not self.returns_rows:
                count = await driver.execute(sql, values)
            else:
                records: Sequence[Sequence[Any]]
                if many:  # (`row_by_row`: SQLite, whose calls are not round trips)
                    records = [r for row in values for r in await driver.fetch(sql, row)]
                else:
                    records = await driver.fetch(sql, values)
                if any(self.results):
                    found = [_processed(record, self.results) for record in records]
                else:
                    found = [tuple(record) for record in records]
                count = len(found)
        except exc.SQLAlchemyError:
            raise
        except Exception as error:
            raise await _translate(connection, sql, error) from error
        if events is not None and events.after_cursor_execute:
            events.after_cursor_execute(sync, None, sql, values, None, many)
        return Rows(found, count, self.keys)


def _value(bind: _Bind, params: Params) -> Any:
    name, processor, default, required = bind
    if name in params:
        value = params[name]
    elif required:
        raise exc.ArgumentError(f"a value is required for bind parameter {name!r}")
    else:
        value = default
    return processor(value) if processor is not None else value


def _processed(record: Any, processors: tuple[_Processor, ...]) -> tuple[Any, ...]:
    return tuple(p(v) if p is not None else v for p, v in zip(processors, record, strict=True))


@functools.lru_cache(maxsize=512)
def _plan(statement: Any, keys: tuple[str, ...], dialect: Dialect, many: bool) -> _Plan | None:
    """The statement compiled for these parameter names, or None when only SQLAlchemy's
    execution can run it. Kept per statement object: the hot statements are built once
    (see `db.base.table`), so there are few."""
    # For a list, as SQLAlchemy compiles it: an INSERT's implicit RETURNING of the new
    # primary key is for one row only.
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=many)
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
        return None
    if compiled.insert_prefetch or compiled.update_prefetch:
        return None  # Python-side defaults: the execution context computes them
    if _orm(statement):
        return None
    binds = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        required = bind.required and name not in keys
        binds.append((name, processor, None if bind.required else bind.effective_value, required))
    returning = compiled.effective_returning
    select = bool(statement.is_select)
    columns = list(statement.selected_columns) if select else list(returning or ())
    results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
    lists = tuple(compiled.bind_names[bind] for bind in compiled.post_compile_params)
    by_length = not compiled.literal_execute_params and not any(
        isinstance(bind.type, TupleType) for bind in compiled.post_compile_params
    )
    return _Plan(
        sql=compiled.string,
        binds=tuple(binds),
        expanding=bool(compiled.post_compile_params or compiled.literal_execute_params),
        compiled=compiled,
        returns_rows=select or bool(returning),
        results=results,
        keys=tuple(str(c.key) for c in columns),
        lists=lists,
        by_length=by_length,
    )


def _orm(statement: Any) -> bool:
    # An ORM statement (select(Job)) gives entities, which only the session makes. Its
    # compiled form does not tell (compiled outside a session, it is plain SQL); the
    # statement carries the ORM's plugin from the entities it names.
    plugin = getattr(statement, "_propagate_attrs", {}).get("compile_state_plugin")
    return bool(plugin == "orm")


async def _driver(
    session: AsyncSession, *, alone: bool = False
) -> tuple[AsyncConnection, _Runner] | None:
    """The session's connection and the driver's under it, in the session's transaction;
    None for a driver this module does not know.

    SQLAlchemy's asyncpg adapter sends BEGIN with the first statement; one sent past it
    would run outside the transaction, so the adapter is made to begin now if it has
    not (`_start_transaction`, what its cursor calls first), unless the statement is to
    commit `alone` (`execute`): then it goes before BEGIN, and the adapter, still outside
    a transaction, sends no COMMIT for it. On SQLite the connection's `begin` event has
    sent BEGIN IMMEDIATE already (`db.session`)."""
    transaction = session.get_transaction()
    found = session.info.get(_DRIVER)
    connection: AsyncConnection
    runner: _Runner
    adapted: Any  # SQLAlchemy's adapter of the driver's connection
    if transaction is not None and found is not None and found[0] is transaction:
        _, connection, runner, adapted = found
    else:
        connection = await session.connection()  # (begins the session's transaction if need be)
        transaction = session.get_transaction()
        fairy = await connection.get_raw_connection()
        adapted = fairy.dbapi_connection
        if isinstance(adapted.driver_connection, sqlite.LoopConnection):
            runner = _SQLite(adapted.driver_connection)
        elif connection.dialect.driver == "asyncpg":
            runner = _Asyncpg(adapted.driver_connection)
        else:
            return None
        # Kept for the transaction's next statements, `alone` ones too: finding the
        # connection again costs two of SQLAlchemy's greenlet hops.
        session.info[_DRIVER] = (transaction, connection, runner, adapted)
    if isinstance(runner, _Asyncpg) and not alone and adapted._transaction is None:
        try:
            await adapted._start_transaction()
        except Exception as error:
            raise await _translate(connection, "BEGIN", error) from error
    return connection, runner


class _Runner(Protocol):
    """A driver's three calls: a statement's changed rows, its rows, a list of them.
    `row_by_row`: a list with RETURNING may run as one statement a row (where a call is
    not a round trip); elsewhere it is SQLAlchemy's one multi-row statement."""

    row_by_row: ClassVar[bool]

    async def execute(self, sql: str, values: list[Any]) -> int: ...

    async def fetch(self, sql: str, values: list[Any]) -> Sequence[Sequence[Any]]: ...

    async def executemany(self, sql: str, values: list[list[Any]]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Asyncpg:
    connection: Any  # asyncpg.Connection
    row_by_row: ClassVar[bool] = False

    async def execute(self, sql: str, values: list[Any]) -> int:
        # The command tag: "UPDATE 3", "DELETE 0", "INSERT 0 1".
        status: str = await self.connection.execute(sql, *values)
        last = status.rpartition(" ")[2]
        return int(last) if last.isdigit() else -1

    async def fetch(self, sql: str, values: list[Any]) -> Sequence[Sequence[Any]]:
        records: Sequence[Sequence[Any]] = await self.connection.fetch(sql, *values)
        return records

    async def executemany(self, sql: str, values: list[list[Any]]) -> None:
        await self.connection.executemany(sql, values)


@dataclass(frozen=True, slots=True)
class _SQLite:
    connection: sqlite.LoopConnection
    row_by_row: ClassVar[bool] = True

    async def execute(self, sql: str, values: list[Any]) -> int:
        async with self.connection.cursor() as cursor:
            await cursor.execute(sql, values)
            return cursor.rowcount

    async def fetch(self, sql: str, values: list[Any]) -> Sequence[Sequence[Any]]:
        async with self.connection.cursor() as cursor:
            await cursor.execute(sql, values)
            rows: list[Sequence[Any]] = await cursor.fetchall()
            return rows

    async def executemany(self, sql: str, values: list[list[Any]]) -> None:
        async with self.connection.cursor() as cursor:
            await cursor.executemany(sql, values)


async def _translate(connection: AsyncConnection, sql: str, error: Exception) -> Exception:
    """`error` as SQLAlchemy's execution would have raised it: the adapter's DBAPI error
    wrapped in `sqlalchemy.exc`, and the connection invalidated when it is gone."""
    fairy = await connection.get_raw_connection()
    adapted: Any = fairy.dbapi_connection
    dialect = connection.dialect
    try:
        adapted._handle_exception(error)  # raises the DBAPI-shaped error
    except Exception as dbapi_error:
        if not isinstance(dbapi_error, dialect.loaded_dbapi.Error):
            return dbapi_error
        disconnected = dialect.is_disconnect(dbapi_error, adapted, None)
        if disconnected:
            await connection.invalidate(dbapi_error)
        return exc.DBAPIError.instance(
            sql,
            None,
            dbapi_error,
            dialect.loaded_dbapi.Error,
            connection_invalidated=disconnected,
            dialect=dialect,
        )
    return error
