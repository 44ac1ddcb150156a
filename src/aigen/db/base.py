"""Declarative base with a naming convention, so Alembic names constraints the same everywhere."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    MetaData,
    Select,
    Table,
    TypeDecorator,
    literal_column,
    or_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.instrumentation import ClassManager

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}  # noqa: RUF012  (SQLAlchemy's own API)


def table(model: type[Model]) -> Table:
    """The model's table, for Core statements built once with bound parameters (the hot
    ones: building a statement anew, with its cache key, costs about what executing it
    does, and the ORM's unit of work more still)."""
    mapped = model.__table__
    assert isinstance(mapped, Table)
    return mapped


def insert_or_skip(
    into: Table,
    conflict: Sequence[str],
    returning: ColumnElement[Any],
    *,
    from_select: tuple[Sequence[str], Select[Any]] | None = None,
) -> dict[bool, Any]:
    """`INSERT … ON CONFLICT (conflict) DO NOTHING RETURNING returning`, built once for
    PostgreSQL (True) and SQLite (False), keyed as `db.session.is_postgres` answers: of
    the bound values, or of a `SELECT` (`from_select`: its columns and the select)."""
    statements = {}
    for postgres, insert in ((True, pg_insert), (False, sqlite_insert)):
        statement = insert(into)
        if from_select is not None:
            statement = statement.from_select(*from_select)
        statements[postgres] = statement.on_conflict_do_nothing(
            index_elements=list(conflict)
        ).returning(returning)
    return statements


def one_of(column: ColumnElement[Any], values: Iterable[str]) -> ColumnElement[bool]:
    """`column IN ('a', 'b')` for a fixed list of our own names (job statuses), the names
    written into the SQL as literals.

    Not an `IN` of parameters: that is an expanding parameter, whose SQL text SQLAlchemy
    renders anew at every execution (a tenth of the job's compare-and-set in CPU). Nor
    `column = $1 OR column = $2`, what this wrote until the nineteenth session: asyncpg's
    statements are prepared, PostgreSQL runs a prepared statement on a generic plan after
    its fifth execution, and a generic plan cannot make an OR of parameters an index
    condition. The intake's count of a key's active jobs read every job the key ever had
    (BENCHMARKS.md). Literals are part of the index condition on both databases, and
    PostgreSQL estimates them from the column's statistics."""
    names = tuple(values)
    for name in names:
        if not _PLAIN_NAME.fullmatch(name):
            raise ValueError(f"one_of takes plain names, not {name!r}")
    return column.in_([literal_column(f"'{name}'", column.type) for name in names])


# What `one_of` writes into SQL as it is: no quote can end its literal early.
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_]*")


def unleased(column: ColumnElement[Any], now: ColumnElement[Any]) -> ColumnElement[bool]:
    """A row that nobody holds: its lease `column` is unset or ran out before `now`
    (the queue's messages, the outbox's rows, the webhook deliveries)."""
    return or_(column.is_(None), column < now)


M = TypeVar("M", bound=Model)


def build(model: type[M], values: Mapping[str, Any]) -> M:
    """`model(**values)`, without the constructor's bookkeeping: the values go straight
    into the new object's `__dict__`, where the mapped attributes read them.

    The constructor sends each value through the attribute's set event, which records it
    as a change for the unit of work: for a job's fifteen columns 21–28 µs of CPU against
    2 µs here (BENCHMARKS.md), on the API's path for every job. Added to a session, a
    built object is inserted like a constructed one; the hot paths insert a new job by
    a Core statement instead (`job_service.create_many`), and make a returned row
    persistent through `as_loaded`. `values` must name mapped attributes only (the
    constructor would refuse another name; this does not check).
    """
    instance: M = _class_manager(model).new_instance()
    instance.__dict__.update(values)
    return instance


@functools.cache
def _class_manager(model: type[Model]) -> ClassManager[Any]:
    # The constructor configures the mappers on first use; an object made without it
    # would otherwise find its attributes not yet set up.
    configure_mappers()
    return model.__mapper__.class_manager


def as_loaded(session: AsyncSession, model: type[M], row: Mapping[Any, Any]) -> M:
    """A row that a Core statement returned (`row`: its columns by key) as the session's
    object, as a query with `populate_existing` would have given it: the object the
    session holds already, brought up to date, or a new one in the session as loaded,
    with no change pending (a change made to it later is saved at the flush).

    For the hot `INSERT` and `UPDATE … RETURNING` statements: through the ORM's own
    path to the same object, the worker's claim took a fifth more CPU, its transaction
    included (BENCHMARKS.md).
    """
    values = {attribute: row[column] for attribute, column in columns_of(model).items()}
    mapper = model.__mapper__
    identity = mapper.identity_key_from_primary_key(
        tuple(values[attribute] for attribute in _primary_key(model))
    )
    held = session.identity_map.get(identity)
    if held is not None:
        assert isinstance(held, model)
        for attribute, value in values.items():
            set_committed_value(held, attribute, value)
        return held
    instance = build(model, values)
    make_transient_to_detached(instance)
    session.add(instance)
    return instance


@functools.cache
def columns_of(model: type[Model]) -> dict[str, str]:
    """Mapped attribute → its column's key (they differ where a column's name is a
    Python one, as `Job.meta` for `metadata`): for Core statements on the table."""
    return {attr.key: attr.columns[0].key for attr in model.__mapper__.column_attrs}


@functools.cache
def _primary_key(model: type[Model]) -> list[str]:
    mapper = model.__mapper__
    return [mapper.get_property_by_column(column).key for column in mapper.primary_key]
