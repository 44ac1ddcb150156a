"""Telling "the database cannot be reached right now" from every other database error.

An unreachable database is nobody's bug and passes by itself: the API answers 503 and
the consumers try the message again later, without counting it toward the limit that
sends poison messages to the dead-letter queue.

asyncpg's own connection errors reach us partly wrapped by SQLAlchemy and partly raw:

    unreachable
    ├── sqlalchemy OperationalError, InterfaceError, pool TimeoutError
    ├── DBAPIError that invalidated its connection, or whose SQLSTATE is a connection
    │   exception (08), insufficient resources (53: "too many clients") or operator
    │   intervention (57P: shutting down, starting up)
    └── raw ConnectionError, TimeoutError (connect and statement timeouts), socket.gaierror,
        and the plain OSError asyncio raises when every address refused the connection
"""

from __future__ import annotations

import socket

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the database did not answer (retry later), not a bad request."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return exc.connection_invalidated or (
            isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES)
        )
    # Not every OSError: a missing file (FileNotFoundError) is a bug that no wait cures.
    return isinstance(exc, ConnectionError | TimeoutError | socket.gaierror) or (
        type(exc) is OSError
    )
