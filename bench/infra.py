"""What a benchmark run borrows and must give back: databases, a RabbitMQ namespace, a Redis
prefix, a temporary folder, and the OS processes it starts.

Every resource is named `aigen_bench_<random>` (or `aigen-bench-<random>`) and removed in
`Resources.aclose()`; every process is stopped by its own PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures import scratch
from tests.fixtures.scratch import free_port

from aigen.backend.account import service as account_service
from aigen.backend.key import service as key_service
from aigen.bus.rabbitmq import RabbitMQBroker
from aigen.db.migrate import upgrade
from aigen.db.session import create_engine, create_sessionmaker, unit_of_work

from . import vacuum
from .vacuum import Autovacuum

POSTGRES_URL = os.environ.get(
    "AIGEN_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
RABBITMQ_URL = os.environ.get("AIGEN_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("AIGEN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

# The scripted provider (DESIGN §11): no model runs, it answers after `latency_ms`.
MODELS = """
[[models]]
name = "bench-0ms"
provider = "scripted"
task = "text"
price_per_request = 1
[models.options]
output = "ok"

[[models]]
name = "bench-200ms"
provider = "scripted"
task = "text"
price_per_request = 1
[models.options]
output = "ok"
latency_ms = 200
"""

HUGE = 10**9  # rpm, concurrency: the limits are checked but never bind


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat), threads included;
    0 once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """One OS process this run started."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def rss_mb(self) -> float | None:
        """Resident size from /proc/<pid>/status (VmRSS), in MiB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, grace: float = 15.0) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.process.wait()


@dataclass
class Customer:
    account_id: str
    key: str


@dataclass
class Resources:
    """The run's temporary folder, databases, namespace, prefix and processes."""

    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aigen-bench-")))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    databases: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)
    # Autovacuum's work on each database, where the server's autovacuum is off (vacuum.py).
    vacuums: list[Autovacuum] = field(default_factory=list)
    keep: bool = False

    @property
    def namespace(self) -> str:
        return f"aigen-bench-{self.tag}."

    @property
    def redis_prefix(self) -> str:
        return f"aigen-bench-{self.tag}:"

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # Databases ---------------------------------------------------------------------

    async def postgres_database(self, suffix: str) -> str:
        name = f"aigen_bench_{self.tag}_{suffix}"
        url = await scratch.create_database(POSTGRES_URL, name)
        self.databases.append(name)
        if await vacuum.needed(url):
            self.vacuums.append(Autovacuum(url))
            self.vacuums[-1].start()
        return url

    # Environments ------------------------------------------------------------------

    def env(
        self, data_dir: Path, *, production: bool, log_level: str, **extra: str
    ) -> dict[str, str]:
        """The environment of every `aigen` process of one stack."""
        models = data_dir / "models.toml"
        models.write_text(MODELS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIGEN_")}
        env.update(
            AIGEN_ENVIRONMENT="production",
            AIGEN_SECRET_KEY=self.secret,
            AIGEN_DATA_DIR=str(data_dir),
            AIGEN_MODELS_FILE=str(models),
            AIGEN_LOCAL_MODELS="false",
            AIGEN_LOG_LEVEL=log_level,
            AIGEN_LOG_JSON="true",
            AIGEN_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8",
        )
        if production:
            env.update(
                AIGEN_BROKER_URL=RABBITMQ_URL,
                AIGEN_REDIS_URL=REDIS_URL,
                AIGEN_RABBITMQ_NAMESPACE=self.namespace,
                AIGEN_REDIS_PREFIX=self.redis_prefix,
            )
        env.update(extra)
        return env

    # Processes ---------------------------------------------------------------------

    async def spawn(self, name: str, args: list[str], env: Mapping[str, str], cwd: Path) -> Proc:
        log = cwd / f"{name}-{len(self.processes)}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *args, env=dict(env), cwd=cwd, stdout=out, stderr=out
            )
        proc = Proc(name, process, log)
        self.processes.append(proc)
        return proc

    async def start_aigen(
        self, part: str, env: Mapping[str, str], cwd: Path, *, label: str | None = None
    ) -> Proc:
        """`python -m aigen <part>`; `api` and `up` listen on a free loopback port."""
        args = ["-m", "aigen", part]
        url = None
        if part in ("api", "up"):
            port = free_port()
            args += ["--host", "127.0.0.1", "--port", str(port)]
            url = f"http://127.0.0.1:{port}"
        proc = await self.spawn(label or part, args, env, cwd)
        proc.url = url
        return proc

    async def stop(self, proc: Proc) -> None:
        await proc.stop()

    # Teardown ----------------------------------------------------------------------

    async def clear_rabbitmq(self) -> None:
        """Delete the namespace's queues and exchanges, with what waits in them; the next
        process that starts declares them anew."""
        with contextlib.suppress(Exception):
            names = RabbitMQBroker(RABBITMQ_URL, namespace=self.namespace)
            await scratch.delete_topology(RABBITMQ_URL, names)

    async def aclose(self) -> None:
        await asyncio.gather(*(proc.stop() for proc in self.processes if proc.running))
        await asyncio.gather(*(v.stop() for v in self.vacuums))
        for name in self.databases:
            await scratch.drop_database(POSTGRES_URL, name)
        await self.clear_rabbitmq()
        await scratch.delete_redis_prefix(REDIS_URL, self.redis_prefix)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


async def migrate(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def customer(database_url: str, secret: str, name: str = "bench") -> Customer:
    """An account with a huge balance and a key with huge limits."""
    engine = create_engine(database_url)
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            account = await account_service.create(session, name, credits=10**12)
            _, key = await key_service.create(
                session, account_id=account.id, secret=secret, rpm=HUGE, concurrency=HUGE
            )
    finally:
        await engine.dispose()
    return Customer(account.id, key)


async def wait_http(proc: Proc, path: str = "/healthz", timeout: float = 60.0) -> None:
    """Until `proc` answers 200 on `path`, or raise with its log."""
    assert proc.url is not None
    host, port = proc.url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready:\n{proc.tail()}")


async def wait_log(proc: Proc, marker: str, timeout: float = 60.0) -> None:
    """Until `marker` shows in the process's log (a consumer subscribed, the relay connected)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        if marker in proc.log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready:\n{proc.tail()}")
