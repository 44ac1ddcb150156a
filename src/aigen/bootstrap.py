"""The composition root: settings in, every adapter out (cosmicpython's `bootstrap`).

The API's lifespan, each worker process and the CLI build their dependencies here, once;
tests swap an adapter by passing their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.broadcast import LocalRevocations, RedisRevocations, Revocations
from aigen.bus.broker import Broker
from aigen.bus.database import DatabaseBroker
from aigen.bus.rabbitmq import RabbitMQBroker
from aigen.config import Settings
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker
from aigen.limits import InProcessLimiter, Limiter
from aigen.limits.redis import RedisLimiter
from aigen.serving.catalog import Catalog
from aigen.storage import create_store
from aigen.storage.base import AssetStore


@dataclass
class Deps:
    settings: Settings
    secret: str
    engine: AsyncEngine
    sessionmaker: Sessionmaker
    broker: Broker
    catalog: Catalog
    store: AssetStore
    limiter: Limiter
    revocations: Revocations = field(default_factory=LocalRevocations)

    async def aclose(self) -> None:
        await self.broker.aclose()
        await self.catalog.aclose()
        await self.store.aclose()
        await self.limiter.aclose()
        await self.revocations.aclose()
        await self.engine.dispose()


def create_broker(settings: Settings, sessionmaker: Sessionmaker) -> Broker:
    if settings.broker_url == "database":
        return DatabaseBroker(
            sessionmaker,
            lease_seconds=settings.lease_seconds,
            poll_interval=settings.poll_interval_seconds,
            idle_poll_max=settings.idle_poll_max_seconds,
            delivery_limit=settings.delivery_limit,
            retry_base=settings.retry_base_seconds,
            retry_max=settings.retry_max_seconds,
        )
    if settings.broker_url.startswith(("amqp://", "amqps://")):
        return RabbitMQBroker(
            settings.broker_url,
            namespace=settings.rabbitmq_namespace,
            delivery_limit=settings.delivery_limit,
            retry_base=settings.retry_base_seconds,
            retry_max=settings.retry_max_seconds,
            retry_buckets=settings.rabbitmq_retry_buckets or None,
        )
    raise ValueError(f"unsupported AIGEN_BROKER_URL {settings.broker_url!r}")


def create_limiter(settings: Settings) -> Limiter:
    """Limits shared by every API process through Redis, else kept in this process."""
    if settings.redis_url:
        return RedisLimiter.from_url(settings.redis_url, prefix=settings.redis_prefix)
    return InProcessLimiter()


def create_revocations(settings: Settings) -> Revocations:
    if settings.redis_url:
        return RedisRevocations.from_url(settings.redis_url, prefix=settings.redis_prefix)
    return LocalRevocations()


async def build_deps(settings: Settings, *, catalog: Catalog | None = None) -> Deps:
    engine = create_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        connect_timeout=settings.database_connect_timeout_seconds,
        pool_timeout=settings.database_pool_timeout_seconds,
        command_timeout=settings.database_command_timeout_seconds,
    )
    sessionmaker = create_sessionmaker(engine)
    store = create_store(settings)
    await store.start()
    broker = create_broker(settings, sessionmaker)
    await broker.start()
    return Deps(
        settings=settings,
        secret=settings.resolved_secret(),
        engine=engine,
        sessionmaker=sessionmaker,
        broker=broker,
        catalog=catalog or Catalog.from_settings(settings),
        store=store,
        limiter=create_limiter(settings),
        revocations=create_revocations(settings),
    )
