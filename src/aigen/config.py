"""Settings: environment variables with the `AIGEN_` prefix, then an optional `aigen.toml`.

Every delay the platform waits on (leases, retry schedules, poll intervals) is a setting,
so tests compress time through the same code paths production uses.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# What `lost_after_seconds` adds to the longest a job can run, for a loaded machine.
LOST_MARGIN_SECONDS = 120.0
DEFAULT_SECRETS = frozenset({"", "changeme", "change-me", "secret", "aigen"})


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIGEN_",
        toml_file="aigen.toml",
        extra="ignore",
    )

    environment: Environment = Environment.development
    data_dir: Path = Path("./data")
    database_url: str = ""
    # PostgreSQL connections each process keeps (and as many again at peaks): every
    # process of a deployment counts against the server's `max_connections`.
    database_pool_size: int = Field(default=10, ge=1)
    # PostgreSQL: how long to wait for a new connection, for a free one in the pool, and
    # for one statement's answer. A database that stops answering then fails requests in
    # seconds (503 at the API) instead of holding them until TCP gives up.
    database_connect_timeout_seconds: float = 5.0
    database_pool_timeout_seconds: float = 10.0
    database_command_timeout_seconds: float | None = 60.0
    broker_url: str = "database"
    redis_url: str | None = None
    # Every Redis key and channel starts with this (several deployments or test runs on one
    # server).
    redis_prefix: str = "aigen:"
    storage_url: str = ""
    secret_key: str = ""
    # Base URL the API is reached at; asset URLs of the local folder store are minted on it.
    public_url: str = "http://127.0.0.1:8000"

    openai_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "AIGEN_OPENAI_API_KEY")
    )
    openai_base_url: str | None = None
    models_file: Path | None = None
    # Local models load lazily on first use; `false` keeps them out of the catalog.
    local_models: bool = True

    log_level: str = "info"
    # JSON log lines (production); unset: JSON outside development.
    log_json: bool | None = None

    # Gateway
    max_body_bytes: int = 256 * 1024
    default_rpm: int = 600
    default_concurrency: int = 20
    key_cache_seconds: float = 5.0
    # How often the backend expires pending jobs whose deadline passed (and refunds them).
    sweep_interval_seconds: float = 1.0

    # Queue (database broker and consumers)
    lease_seconds: float = 30.0
    poll_interval_seconds: float = 0.05
    # An idle relay or embedded-queue consumer polls less and less often, down to this
    # (`aigen.aio.IdlePoll`); a commit in the same process still wakes it at once.
    idle_poll_max_seconds: float = Field(default=1.0, gt=0)
    delivery_limit: int = 5
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    relay_batch: int = 100
    # With RabbitMQ, each process publishes the events it wrote as soon as they commit
    # (`aigen.bus.publisher`); the relay then only picks up what such a process left.
    publish_on_commit: bool = True
    prefetch: int = 8
    # RabbitMQ broker: a prefix for every queue and exchange name (several deployments or
    # test runs on one server), and the TTL retry queues in seconds (comma-separated;
    # unset: retry_base_seconds / 4 times powers of 4 up to retry_max_seconds).
    rabbitmq_namespace: str = ""
    # NoDecode: the environment's `1,5,30` reaches `_split_commas` instead of a JSON parser.
    rabbitmq_retry_buckets: Annotated[list[float], NoDecode] = Field(default_factory=list)

    # Workflow
    worker_concurrency: int = 4
    provider_timeout_seconds: float = 300.0
    provider_max_tries: int = 3
    provider_retry_base_seconds: float = 1.0
    # How often a running job is checked for a cancel, and progress written at most.
    cancel_poll_seconds: float = 1.0
    progress_interval_seconds: float = 0.5
    # A job processing without a sign of life for this long has lost its worker and its
    # message (a crash the broker gave up redelivering): it fails, refunded. Unset: every
    # try at its time limit, the longest pauses between tries, and a margin.
    lost_after_seconds: float | None = Field(default=None, gt=0)

    def resolved_lost_after(self) -> float:
        if self.lost_after_seconds is not None:
            return self.lost_after_seconds
        tries = max(1, self.provider_max_tries)
        # A pause is an exponential backoff or an upstream's Retry-After (at most 60 s),
        # with up to 20 % jitter (`workflow.handlers.retry_delay`).
        pauses = sum(
            max(self.provider_retry_base_seconds * 2.0 ** (n - 1), 60.0) * 1.2
            for n in range(1, tries)
        )
        return self.provider_timeout_seconds * tries + pauses + LOST_MARGIN_SECONDS

    # Assets
    asset_url_ttl_seconds: int = 3600

    # Webhooks (DESIGN §7)
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout_seconds: float = 15.0
    webhook_jitter: float = 0.2
    webhook_min_delay_after_throttle_seconds: float = 60.0
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_disable_after_seconds: float = 5 * 24 * 3600.0
    # Refuse `http://` endpoint URLs (at creation and at every attempt).
    webhook_https_only: bool = False
    # Attempts one notifier process makes at once.
    webhook_concurrency: int = Field(default=16, ge=1)
    # `GET /v1/events` shows an event once it is this old: a PostgreSQL transaction may
    # commit after a later-numbered one, and a cursor must not pass it while in flight.
    events_feed_delay_seconds: float = Field(default=2.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator(
        "webhook_retry_schedule", "webhook_allow_networks", "rabbitmq_retry_buckets", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # `AIGEN_WEBHOOK_RETRY_SCHEDULE=0,5,300` reads as a list, as DESIGN §11 promises.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _defaults_and_safety(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'aigen.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.data_dir / 'assets'}"
        if self.environment is Environment.development and not self.webhook_allow_networks:
            # `aigen up` and the demo deliver to receivers on this machine (DESIGN §7).
            self.webhook_allow_networks = ["127.0.0.0/8", "::1/128"]
        weak = self.secret_key.strip().lower() in DEFAULT_SECRETS or len(self.secret_key) < 32
        if self.environment is Environment.production and weak:
            raise ValueError(
                "AIGEN_SECRET_KEY must be set to 32 or more random characters in production"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def resolved_secret(self) -> str:
        """The server secret; outside production it is generated into the data folder once."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        path.write_text(value)
        path.chmod(0o600)
        return value
