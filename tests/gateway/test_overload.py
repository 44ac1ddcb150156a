"""An API process whose database pool stays exhausted sheds load with a 503, not a 500."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tests.fixtures.platform import Api

from .test_errors import GOOD, assert_problem


async def test_pool_timeout_is_503_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer = await api.customer()
    async with api.client(customer) as client:
        assert (await client.get("/v1/account")).status_code == 200  # the key is cached

        def exhausted(*args: Any, **kwargs: Any) -> Any:
            raise PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached")

        monkeypatch.setattr(api.deps, "sessionmaker", exhausted)
        answer = await client.post("/v1/generate", json=GOOD)
    body = assert_problem(answer, 503, "service_unavailable")
    assert body["retryable"] is True
    assert answer.headers["retry-after"] == "2"
    assert answer.headers["x-ratelimit-limit"]
