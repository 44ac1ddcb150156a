"""One production deployment's configuration: the environment every `aigen` process reads.

`open_production` takes a fresh slice of the real servers (see `servers.py`), migrates the
database, and yields the `AIGEN_*` environment pointing at it with every delay compressed
the way `tests/conftest.py::make_settings` compresses them; afterwards it removes the
slice again.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aigen.backend.account import service as account_service
from aigen.backend.key import service as key_service
from aigen.db.migrate import upgrade
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker, unit_of_work
from tests.fixtures.platform import Customer
from tests.fixtures.processes import MODELS as SCRIPTED_TEXT

from .servers import (
    RABBITMQ_URL,
    REDIS_URL,
    RETRY_BUCKETS,
    create_database,
    delete_namespace,
    delete_redis_prefix,
    drop_database,
    unique,
)

# Every module of the suite: one event loop for the package (the deployment outlives a
# test) and the markers of the servers it needs.
MARKS = [
    pytest.mark.asyncio(loop_scope="package"),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.redis,
    pytest.mark.slow,
]

SECRET = "production-test-secret-" + "p" * 40
# Seven processes share a PostgreSQL server that other test runs use too.
POOL_SIZE = 4

# scripted-text holds 6 credits with max_tokens 5 (1 + 5 output tokens) and charges 5.
MODELS = (
    SCRIPTED_TEXT
    + """
[[models]]
name = "scripted-slow"
provider = "scripted"
task = "text"
price_per_request = 2
[models.options]
output = "slow answer"
latency_ms = 1000

[[models]]
name = "scripted-broken"
provider = "scripted"
task = "text"
price_per_request = 3
[models.options]
fail_rate = 1.0
fail_code = "content_rejected"

[[models]]
name = "scripted-stuck"
provider = "scripted"
task = "text"
price_per_request = 1
[models.options]
output = "too late"
latency_ms = 60000

[[models]]
name = "scripted-paced"
provider = "scripted"
task = "text"
price_per_request = 1
[models.options]
output = "paced answer"
latency_ms = 150
"""
)


@dataclass
class Production:
    """A deployment's servers and the environment that points `aigen` processes at them."""

    database_url: str
    namespace: str
    redis_prefix: str
    bucket: str
    s3_endpoint: str
    env: dict[str, str]
    workdir: Path
    sessionmaker: Sessionmaker

    async def customer(self, *, credits: int, **key_options: Any) -> Customer:
        """An account with `credits` and a key without practical limits unless given."""
        options: dict[str, Any] = {"rpm": 100_000, "concurrency": 10_000, **key_options}
        async with unit_of_work(self.sessionmaker) as session:
            account = await account_service.create(session, "production-test", credits=credits)
            row, key = await key_service.create(
                session, account_id=account.id, secret=SECRET, **options
            )
        return Customer(account.id, key, row.id)


def environment(
    *, database_url: str, namespace: str, redis_prefix: str, storage_url: str, workdir: Path
) -> dict[str, str]:
    models = workdir / "models.toml"
    models.write_text(MODELS)
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AIGEN_", "AWS_", "OPENAI_"))
    }
    return inherited | {
        "AIGEN_ENVIRONMENT": "test",
        "AIGEN_DATA_DIR": str(workdir / "data"),
        "AIGEN_DATABASE_URL": database_url,
        "AIGEN_BROKER_URL": RABBITMQ_URL,
        "AIGEN_RABBITMQ_NAMESPACE": namespace,
        "AIGEN_RABBITMQ_RETRY_BUCKETS": RETRY_BUCKETS,
        "AIGEN_REDIS_URL": REDIS_URL,
        "AIGEN_REDIS_PREFIX": redis_prefix,
        "AIGEN_STORAGE_URL": storage_url,
        "AIGEN_SECRET_KEY": SECRET,
        "AIGEN_MODELS_FILE": str(models),
        "AIGEN_LOCAL_MODELS": "false",
        "AIGEN_DATABASE_POOL_SIZE": str(POOL_SIZE),
        # Info: the stack waits for each consumer's `rabbitmq.consuming` line.
        "AIGEN_LOG_LEVEL": "info",
        "AIGEN_LOG_JSON": "true",
        "AIGEN_DELIVERY_LIMIT": "3",
        "AIGEN_RETRY_BASE_SECONDS": "0.05",
        "AIGEN_RETRY_MAX_SECONDS": "0.8",
        "AIGEN_PROVIDER_RETRY_BASE_SECONDS": "0.01",
        "AIGEN_CANCEL_POLL_SECONDS": "0.5",
        "AIGEN_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.4,0.8,1.6",
        "AIGEN_WEBHOOK_MIN_DELAY_AFTER_THROTTLE_SECONDS": "0.2",
        "AIGEN_WEBHOOK_TIMEOUT_SECONDS": "5",
        "AIGEN_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "AIGEN_EVENTS_FEED_DELAY_SECONDS": "0",
        # Fake credentials for moto, and nothing from a developer's own AWS set-up.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@asynccontextmanager
async def open_production(
    s3_endpoint: str, workdir: Path, *, migrate: bool = True
) -> AsyncIterator[Production]:
    """A fresh database (migrated unless told not to), namespace, prefix and bucket; all
    removed afterwards."""
    database_url = await create_database()
    namespace = unique("ns") + "."
    redis_prefix = unique("redis") + ":"
    bucket = unique("bucket")
    engine = create_engine(database_url)
    try:
        if migrate:
            await upgrade(engine)
        env = environment(
            database_url=database_url,
            namespace=namespace,
            redis_prefix=redis_prefix,
            storage_url=f"s3://{bucket}?endpoint_url={s3_endpoint}&region=us-east-1",
            workdir=workdir,
        )
        yield Production(
            database_url,
            namespace,
            redis_prefix,
            bucket,
            s3_endpoint,
            env,
            workdir,
            create_sessionmaker(engine),
        )
    finally:
        await engine.dispose()
        await delete_namespace(namespace)
        await delete_redis_prefix(redis_prefix)
        await drop_database(database_url)
