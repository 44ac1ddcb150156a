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

import aio_pika
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from yarl import URL

from aigen.bus.rabbitmq import RabbitMQBroker
from aigen.db.session import create_engine
from tests.conftest import POSTGRES_URL

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
    name = unique("db").replace("-", "_")
    admin = create_engine(POSTGRES_URL)
    try:
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    name = make_url(url).database
    admin = create_engine(POSTGRES_URL)
    try:
        async with admin.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def namespace_broker(namespace: str) -> RabbitMQBroker:
    """A broker object (never started) that knows the namespace's queue and exchange names."""
    buckets = [float(value) for value in RETRY_BUCKETS.split(",")]
    return RabbitMQBroker(RABBITMQ_URL, namespace=namespace, retry_buckets=buckets)


async def delete_namespace(namespace: str) -> None:
    """Delete every queue and exchange of `namespace` (messages and all)."""
    names = namespace_broker(namespace)
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        async with connection.channel() as channel:
            for queue in names.queue_names():
                await channel.queue_delete(queue)
            for exchange in names.exchange_names():
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def delete_redis_prefix(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


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
