"""Which database errors are a 503 (retry later) and which a 500 (our bug).

A server that refuses work for now reaches the handler as a plain `DBAPIError` carrying
asyncpg's SQLSTATE; the real-server outage itself is tested in `tests/production`.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request

from aigen.gateway.exception_handlers import database_error


class _AsyncpgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def _request() -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": []})


@pytest.mark.parametrize(
    ("sqlstate", "status"),
    [
        ("53300", 503),  # too many clients already
        ("57P03", 503),  # the database system is starting up
        ("57P01", 503),  # terminating connection due to administrator command
        ("08006", 503),  # connection failure
        ("42P01", 500),  # undefined table: a bug, not an outage
        ("23505", 500),  # unique violation that escaped a service
    ],
)
async def test_sqlstate_decides(sqlstate: str, status: int) -> None:
    error = DBAPIError("SELECT 1", None, _AsyncpgError(sqlstate))
    response = await database_error(_request(), error)
    assert response.status_code == status
    if status == 503:
        assert response.headers["retry-after"]
        assert json.loads(bytes(response.body))["code"] == "service_unavailable"
