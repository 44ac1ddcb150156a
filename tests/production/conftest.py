"""The production suite's fixtures: real servers, and every part of aigen a process of its own.

`production` is one slice of the servers (database, RabbitMQ namespace, Redis prefix, S3
bucket on moto) for the whole package; `stack` is the deployment of issue 3 on it, 2 `api`
+ 2 `worker` + `backend` + `notifier` + `relay`, started once (process start-up is most of
the cost on two cores). Tests stop and kill parts; each test that asks for `stack` first
tops it back up to that shape, so the tests do not depend on their order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from aigen.bus.topology import BINDINGS, dead_letter_queue
from tests.fixtures.stack import Stack
from tests.notifications.receiver import WebhookReceiverDouble
from tests.storage.conftest import endpoint_of, start_moto, stop_moto

from .deployment import Production, open_production
from .queues import drain_queue
from .servers import require_servers

STACK = {"api": 2, "worker": 2, "backend": 1, "notifier": 1, "relay": 1}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port, shared by every process of the suite."""
    require_servers()
    server = start_moto()
    yield endpoint_of(server)
    stop_moto(server)


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def production(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Production]:
    async with open_production(s3_endpoint, tmp_path_factory.mktemp("production")) as opened:
        yield opened


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def shared_stack(production: Production) -> AsyncIterator[Stack]:
    stack = Stack(production.env, production.workdir)
    try:
        await stack.start_many(STACK)
        yield stack
    finally:
        await stack.aclose()


@pytest_asyncio.fixture(loop_scope="package")
async def stack(shared_stack: Stack, production: Production) -> Stack:
    """The shared deployment, with any part an earlier test stopped started again."""
    await shared_stack.ensure(STACK)
    # A dead letter left by an earlier test (which then failed its own check) would fail
    # every later test's "no message left" check too.
    for queue in BINDINGS:
        await drain_queue(production.namespace, dead_letter_queue(queue))
    return shared_stack


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def receiver() -> AsyncIterator[WebhookReceiverDouble]:
    async with WebhookReceiverDouble() as running:
        yield running
