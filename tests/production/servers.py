"""The real servers these tests run against, and the per-run slice each test takes of them.

PostgreSQL, RabbitMQ and Redis on loopback (override with `AIGEN_TEST_POSTGRES_URL`,
`AIGEN_TEST_RABBITMQ_URL`, `AIGEN_TEST_REDIS_URL`). Each run gets a database of its own, a
RabbitMQ namespace (a prefix on every queue and exchange) and a Redis key prefix, all
removed afterwards, so runs on one machine never see each other.

Outside CI an unreachable server skips these tests; in CI (`CI` set) it fails them:
`.ci/run` starts the servers, so there an unreachable one is a broken build.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid

import pytest
from sqlalchemy.engine import make_url
from yarl import URL

from aigen.bus.rabbitmq import RabbitMQBroker
from tests.conftest import POSTGRES_URL
from tests.fixtures import scratch

RABBITMQ_URL = os.environ.get("AIGEN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("AIGEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Compressed delays: retry rungs of 50, 200 and 800 ms.
RETRY_BUCKETS = "0.05,0.2,0.8"


def require_servers() -> None:
    """Skip (fail in CI) unless PostgreSQL, RabbitMQ and Redis accept connections."""
    targets = {
        "PostgreSQL": (make_url(POSTGRES_URL).host, make_url(POSTGRES_URL).port or 5432),
        "RabbitMQ": (URL(RABBITMQ_URL).host, URL(RABBITMQ_URL).port or 5672),
        "Redis": (URL(REDIS_URL).host, URL(REDIS_URL).port or 6379),
    }
    for name, (host, port) in targets.items():
        try:
            with socket.create_connection((host or "127.0.0.1", port), timeout=2):
                pass
        except OSError as exc:
            message = f"{name} is not reachable at {host}:{port}: {exc!r}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


def unique(kind: str) -> str:
    return f"aigen-test-{kind}-{uuid.uuid4().hex[:10]}"


async def create_database() -> str:
    """A fresh, empty PostgreSQL database; returns its URL."""
    return await scratch.create_database(POSTGRES_URL, unique("db").replace("-", "_"))


async def drop_database(url: str) -> None:
    name = make_url(url).database
    assert name is not None
    await scratch.drop_database(POSTGRES_URL, name)


def namespace_broker(namespace: str) -> RabbitMQBroker:
    """A broker object (never started) that knows the namespace's queue and exchange names."""
    buckets = [float(value) for value in RETRY_BUCKETS.split(",")]
    return RabbitMQBroker(RABBITMQ_URL, namespace=namespace, retry_buckets=buckets)


async def delete_namespace(namespace: str) -> None:
    """Delete every queue and exchange of `namespace` (messages and all)."""
    await scratch.delete_topology(RABBITMQ_URL, namespace_broker(namespace))


async def delete_redis_prefix(prefix: str) -> None:
    await scratch.delete_redis_prefix(REDIS_URL, prefix)


async def rabbitmqctl(*args: str) -> None:
    """Run `rabbitmqctl` on the local server (root, or the server's own user)."""
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed here"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {output.decode()[-2000:]}"
