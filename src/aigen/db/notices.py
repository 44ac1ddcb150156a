"""Notices after a commit: "these rows changed", heard at once by whoever waits for them.

A transaction names items (job ids) on a channel (`after_commit`). Once it has committed,
the `Listener`s of this process hear them straight away, and with PostgreSQL so do those
of other processes: the committing connection sends `pg_notify(channel, 'id,id,…')` when
it goes back to the pool (after the commit, outside any lock), and each `Listener` holds
a connection of its own that `LISTEN`s. A notice is only a hint, sent once and never
kept: a listener that is reconnecting misses it, so whoever waits also looks again after
a while (`Watch.wait` times out).

A statement that returns the rows it changed can carry its notice itself
(`notifying`): PostgreSQL sends a NOTIFY made inside a transaction when that commits, so
the notice goes out with the commit, not in a round trip of its own after it (the
backend's settlement of a result that comes alone, one statement that commits by itself).

The outbox's wake-ups (`aigen.bus.outbox`) are notices too, with no items: the relay
listens with `on_notice`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import structlog
from sqlalchemy import event, func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.util import await_only

from aigen.aio import sleep_or_stop, wait_any

from .session import Sessionmaker

log = structlog.get_logger(__name__)

# session.info: {channel: items} named in this transaction; pool record info: the same,
# to send once the connection is checked in (the commit done).
_PENDING = "aigen.notices.pending"
_SEND = "aigen.notices.send"
# session.info: {channel: items} that the transaction's statements notify themselves
# (`notifying`): told to this process's listeners only.
_SENT = "aigen.notices.sent"
# The label of `notifying`'s column among a statement's returned ones.
_NOTIFIED = "aigen_notified"
# PostgreSQL refuses a payload of 8000 bytes or more; a notice carries fewer ids.
MAX_PAYLOAD_CHARS = 7000
LISTEN_RETRY_SECONDS = 5.0
# A bound on the items a listener remembers (`Listener`), whatever the rate.
MAX_REMEMBERED = 100_000
# The listeners of this process, by channel.
_listening: dict[str, weakref.WeakSet[Listener]] = {}


def after_commit(
    session: AsyncSession, channel: str, items: Iterable[str] = (), *, sent: bool = False
) -> None:
    """Tell `channel`'s listeners about `items` (or only that something changed) once the
    caller's transaction commits. `sent`: a statement of the transaction has notified
    PostgreSQL's listeners already (`notifying`), so only this process's are told here."""
    pending: dict[str, set[str]] = session.info.setdefault(_SENT if sent else _PENDING, {})
    pending.setdefault(channel, set()).update(items)


def notifying(statement: UpdateBase, channel: str, item: ColumnElement[str]) -> UpdateBase:
    """`statement` (`… RETURNING`) with a column that notifies `channel` of `item` for each
    row it returns, on PostgreSQL: delivered when the statement's transaction commits, as
    `after_commit`'s notice, and never for a rollback. Its caller then tells this
    process's listeners with `after_commit(..., sent=True)`."""
    return statement.returning(func.pg_notify(channel, item).label(_NOTIFIED))


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    pending: dict[str, set[str]] | None = session.info.get(_PENDING)
    if not pending:
        return
    connection = session.connection()
    info = connection.connection.record_info
    if connection.dialect.name == "postgresql" and info is not None:
        sends: dict[str, set[str]] = info.setdefault(_SEND, {})
        for channel, items in pending.items():
            sends.setdefault(channel, set()).update(items)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for key in (_PENDING, _SENT):
        for channel, items in session.info.pop(key, {}).items():
            for listener in list(_listening.get(channel, ())):
                listener.heard(items)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
    session.info.pop(_SENT, None)


@event.listens_for(Pool, "checkin")
def _send_on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is None or dbapi_connection is None:
        return
    sends: dict[str, set[str]] | None = record.record_info.pop(_SEND, None)
    if not sends:
        return
    with contextlib.suppress(Exception):
        # Outside a transaction: delivered at once. A failure only costs the waiters'
        # timeouts.
        for channel, items in sends.items():
            for payload in payloads(items):
                await_only(
                    dbapi_connection.driver_connection.execute(
                        "SELECT pg_notify($1, $2)", channel, payload
                    )
                )


def listen_dsn(sessionmaker: Sessionmaker) -> str | None:
    """Where to `LISTEN` for the database of `sessionmaker` (PostgreSQL through asyncpg,
    as a plain asyncpg DSN), or None."""
    url = getattr(sessionmaker.kw.get("bind"), "url", None)
    if url is None or url.drivername != "postgresql+asyncpg":
        return None
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


def payloads(items: Iterable[str]) -> Iterator[str]:
    """`items` joined by commas, in as few payloads as PostgreSQL takes; a notice that
    names no item (the outbox's "rows were added") is one empty payload."""
    chunk: list[str] = []
    size = 0
    sent = False
    for item in sorted(items):
        if chunk and size + len(item) + 1 > MAX_PAYLOAD_CHARS:
            yield ",".join(chunk)
            sent = True
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    if chunk or not sent:
        yield ",".join(chunk)


class Watch:
    """One item's waiter: `wait` returns early once a notice names the item."""

    def __init__(self, listener: Listener, *, heard: bool = False) -> None:
        self._listener = listener
        self._heard = asyncio.Event()
        if heard:
            self._heard.set()

    @property
    def hearing(self) -> bool:
        """Whether a notice would reach this watch now (the listener is connected)."""
        return self._listener.hearing

    async def wait(self, seconds: float) -> bool:
        """Wait for a notice, at most `seconds`; whether one came. One that came since
        the watch began, or since the last `wait`, counts; each is counted once."""
        if seconds > 0 and not self._heard.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heard.wait(), seconds)
        heard = self._heard.is_set()
        self._heard.clear()
        return heard

    def hear(self) -> None:
        """A notice named the item: the current or next `wait` returns at once."""
        self._heard.set()


class Listener:
    """Hears one channel's notices (this process's commits, and with PostgreSQL every
    process's) and wakes the `watch`es of the items they name.

    The items heard in the last `remember_seconds` are kept: a watch that begins just
    after its item's notice (the backend was quicker than the notifier's delivery) starts
    as heard, rather than waiting for a notice that came already.
    """

    def __init__(
        self,
        channel: str,
        sessionmaker: Sessionmaker,
        *,
        remember_seconds: float = 5.0,
        on_notice: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self._remember = remember_seconds
        # Called for every notice, and when the listening connection is lost (a notice
        # may have been missed): the relay's wake-up.
        self._on_notice = on_notice
        self._watches: dict[str, set[Watch]] = {}
        # Item → when it was heard (`time.monotonic`), oldest first.
        self._recent: OrderedDict[str, float] = OrderedDict()
        # Without PostgreSQL, this process's own commits are all there is to hear.
        self._dsn = listen_dsn(sessionmaker)
        self._connected = False
        _listening.setdefault(channel, weakref.WeakSet()).add(self)

    @property
    def hearing(self) -> bool:
        """Connected to PostgreSQL's notices; without PostgreSQL, always (SQLite is the
        embedded default, one process: its own commits are all it could hear)."""
        return self._dsn is None or self._connected

    @property
    def connected(self) -> bool:
        """Listening on PostgreSQL, where other processes' commits are heard too."""
        return self._connected

    @contextlib.contextmanager
    def watch(self, item: str) -> Iterator[Watch]:
        """A `Watch` of `item` for the duration of the block."""
        self._forget_old()
        watch = Watch(self, heard=item in self._recent)
        watches = self._watches.setdefault(item, set())
        watches.add(watch)
        try:
            yield watch
        finally:
            watches.discard(watch)
            if not watches:
                del self._watches[item]

    def heard(self, items: Iterable[str]) -> None:
        now = time.monotonic()
        for item in items:
            self._recent[item] = now
            self._recent.move_to_end(item)
            for watch in self._watches.get(item, ()):
                watch.hear()
        self._forget_old()
        if self._on_notice is not None:
            self._on_notice()

    def _forget_old(self) -> None:
        if not self._recent:
            return
        horizon = time.monotonic() - self._remember
        while self._recent and (
            next(iter(self._recent.values())) < horizon or len(self._recent) > MAX_REMEMBERED
        ):
            self._recent.popitem(last=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen on PostgreSQL until `stop` is set; reconnect when the connection is lost.

        Without PostgreSQL (SQLite, one process) there is nothing to listen to: this
        process's commits are heard without it.
        """
        dsn = self._dsn
        while dsn is not None and not stop.is_set():
            connection = await self._listen(dsn)
            if connection is None:
                await sleep_or_stop(stop, LISTEN_RETRY_SECONDS)
                continue
            lost = asyncio.Event()
            connection.add_termination_listener(lambda *_, lost=lost: lost.set())
            self._connected = True
            try:
                await wait_any(None, stop, lost)
            finally:
                self._connected = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
            if not stop.is_set():
                log.warning("notices.listener_lost", channel=self.channel)
                if self._on_notice is not None:
                    self._on_notice()

    def _on_payload(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.heard(payload.split(",") if payload else ())

    async def _listen(self, dsn: str) -> Any:
        connection = None
        try:
            connection = await asyncio.wait_for(asyncpg.connect(dsn), 10)
            await connection.add_listener(self.channel, self._on_payload)
        except Exception as error:
            # The waiters still look again when their waits time out.
            log.warning("notices.listen_failed", channel=self.channel, error=repr(error))
            if connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
            return None
        return connection
