"""Which errors mean "the database is unreachable": retried without limit, never a bug."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from aigen.db.errors import unreachable


class _AsyncpgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def _dbapi(sqlstate: str, *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", None, _AsyncpgError(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "error",
    [
        _dbapi("53300"),  # too many clients already
        _dbapi("57P01"),  # terminating connection due to administrator command
        _dbapi("08006"),  # connection failure
        _dbapi("XX000", invalidated=True),
        OperationalError("SELECT 1", None, Exception("gone")),
        InterfaceError("SELECT 1", None, Exception("connection is closed")),
        PoolTimeoutError("QueuePool limit reached"),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionError("unexpected connection_lost() call"),
        TimeoutError(),
        socket.gaierror(-2, "Name or service not known"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed"),
    ],
)
def test_unreachable(error: BaseException) -> None:
    assert unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        _dbapi("42P01"),  # undefined table: a bug, not an outage
        IntegrityError("INSERT", None, _AsyncpgError("23505")),
        FileNotFoundError(2, "No such file"),
        ValueError("bad input"),
    ],
)
def test_not_unreachable(error: BaseException) -> None:
    assert not unreachable(error)
