"""The long-running parts, each a coroutine that runs until `stop` is set.

`aigen up` runs them all in one process; `aigen api|worker|backend|notifier|relay` runs one
each. On stop, consumers take no new message and finish the ones in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Generator, Iterable

import structlog
import uvicorn

from aigen.backend import handlers as backend_handlers
from aigen.backend import sweeper
from aigen.backend.job import service as job_service
from aigen.bootstrap import Deps
from aigen.bus import outbox
from aigen.bus.broker import TransactionalPublisher
from aigen.bus.outbox import Relay
from aigen.bus.patience import patient
from aigen.bus.publisher import OutboxPublisher
from aigen.bus.soon import retry_soon
from aigen.bus.topology import BACKEND, NOTIFICATIONS, WORKFLOW
from aigen.db import notices
from aigen.gateway.app import create_app, listen
from aigen.notifications import handlers as notification_handlers
from aigen.notifications.dispatcher import SETTLE_LINGER_SECONDS, Dispatcher
from aigen.serving.base import Usage
from aigen.serving.catalog import UnknownModelError
from aigen.workflow.handlers import Workflow

# gen0 collections run every this many net allocations (CPython: 700).
GC_THRESHOLD_GEN0 = 50_000

log = structlog.get_logger(__name__)

Part = Callable[[Deps, asyncio.Event], Awaitable[None]]


def pricer(deps: Deps) -> Callable[[str, Usage], int]:
    def price(model: str, usage: Usage) -> int:
        try:
            return deps.catalog.get(model).charge(usage)
        except UnknownModelError:
            # A model removed from the catalog while its job ran: charge nothing rather
            # than guess; the hold is released in full.
            return 0

    return price


def patience(deps: Deps) -> float:
    """Seconds a consumer waits before trying again a message the database was away for."""
    return min(5.0, deps.settings.retry_max_seconds)


async def run_relay(deps: Deps, stop: asyncio.Event) -> None:
    relay = Relay(
        deps.sessionmaker,
        deps.broker,
        batch=deps.settings.relay_batch,
        poll_interval=deps.settings.poll_interval_seconds,
        idle_poll_max=deps.settings.idle_poll_max_seconds,
    )
    await relay.run(stop)


async def run_publisher(deps: Deps, stop: asyncio.Event) -> None:
    await OutboxPublisher(deps.sessionmaker, deps.broker).run(stop)


def publishes_on_commit(deps: Deps, names: Iterable[str]) -> bool:
    """Whether this process publishes its own events once they commit: with a broker
    outside the database, unless turned off, in every process but a lone relay."""
    return (
        deps.settings.publish_on_commit
        and not isinstance(deps.broker, TransactionalPublisher)
        and set(names) != {"relay"}
    )


async def run_worker(deps: Deps, stop: asyncio.Event) -> None:
    workflow = Workflow(deps.sessionmaker, deps.catalog.provider, deps.store, deps.settings)
    await deps.broker.consume(
        WORKFLOW,
        patient(workflow.handle, delay=patience(deps)),
        stop=stop,
        prefetch=deps.settings.worker_concurrency,
        on_dead_letter=backend_handlers.make_dead_letter_hook(deps.sessionmaker),
    )


async def run_backend(deps: Deps, stop: asyncio.Event) -> None:
    # A task group: if the consumer fails, the sweeper stops with it and both restart.
    async with asyncio.TaskGroup() as group:
        group.create_task(
            deps.broker.consume(
                BACKEND,
                patient(
                    backend_handlers.make_handler(
                        deps.sessionmaker, pricer(deps), limiter=deps.limiter
                    ),
                    delay=patience(deps),
                ),
                stop=stop,
                prefetch=deps.settings.prefetch,
            )
        )
        group.create_task(
            sweeper.run(
                deps.sessionmaker,
                stop,
                interval=deps.settings.sweep_interval_seconds,
                lost_after=deps.settings.resolved_lost_after(),
            )
        )


# From a result's announcement to the backend's commit of it, usually (BENCHMARKS.md:
# 7–10 ms p50 at 10–50 jobs/s on 2 cores): while the notifier does not hear the backend's
# notices, its first look waits that long.
BACKEND_APPLIES_SECONDS = 0.01
# While the notifier hears the backend's notices of ended jobs (`aigen.db.notices`), its
# first look waits for the job's notice, or at most until the event is this old (a lost
# notice), and after a look that found the job not yet ended it waits for the notice, or
# at most these pauses, in hand: a second in all (the backend's lag at the most a 2-core
# machine can take) before it hands the message back to the broker.
NOTICE_WAIT_SECONDS = 0.1
NOTICED_PAUSES = (0.05, 0.15, 0.3, 0.5)


async def run_notifier(deps: Deps, stop: asyncio.Event) -> None:
    dispatcher = Dispatcher(
        deps.sessionmaker,
        deps.settings,
        payload_builder=notification_handlers.make_payload_builder(deps.store, deps.settings),
        concurrency=deps.settings.webhook_concurrency,
        https_only=deps.settings.webhook_https_only,
        # Not on SQLite: there `aigen up`'s maximum fell by a tenth to a fifth with the
        # records lingering, and its CPU per job below the maximum did not clearly fall
        # (BENCHMARKS.md, the twenty-first session).
        settle_linger=0.0 if deps.engine.dialect.name == "sqlite" else SETTLE_LINGER_SECONDS,
    )
    ended = notices.Listener(job_service.ENDED, deps.sessionmaker)
    await asyncio.gather(
        deps.broker.consume(
            NOTIFICATIONS,
            # The notifier races the backend for each result; its retries are taken in
            # hand (`retry_soon`) instead of through the broker's delay queues: it first
            # lets the backend have the time it usually takes, and then waits for its
            # notice that the job has ended.
            retry_soon(
                patient(
                    notification_handlers.make_handler(
                        deps.sessionmaker,
                        dispatcher=dispatcher,
                        wait_seconds=sum(NOTICED_PAUSES),
                    ),
                    delay=patience(deps),
                ),
                up_to=sum(NOTICED_PAUSES),
                pauses=NOTICED_PAUSES,
                first_at_age=BACKEND_APPLIES_SECONDS,
                watch=lambda envelope: ended.watch(envelope.job_id),
                first_at_age_hearing=NOTICE_WAIT_SECONDS,
            ),
            stop=stop,
            prefetch=deps.settings.prefetch,
        ),
        dispatcher.run(stop),
        ended.run(stop),
    )


BACKGROUND: dict[str, Part] = {
    "relay": run_relay,
    "worker": run_worker,
    "backend": run_backend,
    "notifier": run_notifier,
}


async def run_parts(
    deps: Deps,
    names: Iterable[str],
    stop: asyncio.Event,
    *,
    serving: Awaitable[None] | None = None,
) -> None:
    """Run background parts until `stop`; one that crashes is logged and restarted.

    With the embedded queue (a broker in the database), the events the process adds go
    into the queue in their own transactions (`outbox.write_through`); the relay then
    only publishes the rare ones added otherwise.

    The process's own outbox publisher (`publishes_on_commit`) runs beside them and
    outlives them and `serving` (the process's API server, if any): the jobs, messages
    and requests they finish after `stop` still have their events published at once,
    not by the relay once the lease has run out."""

    async def supervised(name: str, part: Part, until: asyncio.Event) -> None:
        while not until.is_set():
            try:
                await part(deps, until)
            except Exception:
                log.exception("part.crashed", part=name)
                await asyncio.sleep(1.0)

    names = list(names)  # read twice below
    # Consumers allocate per message what a request does: the same reasons hold.
    quiet_garbage_collector()
    done = asyncio.Event()
    publishing = None
    if publishes_on_commit(deps, names):
        publishing = asyncio.create_task(supervised("publisher", run_publisher, done))
    # With the embedded queue, the events go into it in their own transactions.
    queue = deps.broker if isinstance(deps.broker, TransactionalPublisher) else None
    try:
        with outbox.write_through(deps.sessionmaker, queue) if queue else contextlib.nullcontext():
            await asyncio.gather(
                *(supervised(name, BACKGROUND[name], stop) for name in names),
                *([serving] if serving is not None else []),
            )
    finally:
        done.set()
        if publishing is not None:
            await publishing


async def serve_api(
    deps: Deps, stop: asyncio.Event, *, host: str, port: int, ready: asyncio.Event | None = None
) -> None:
    app = create_app(deps.settings, deps=deps)
    # lifespan="off" below: the listeners that the lifespan would start run here.
    watcher = asyncio.create_task(listen(app, stop))
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = EmbeddedServer(config)
    quiet_garbage_collector()
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if ready is not None:
        ready.set()
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    waiter.cancel()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


def quiet_garbage_collector() -> None:
    """Move what start-up built (modules, the app, SQLAlchemy's caches) out of the
    collector's reach, and collect the young generation less often.

    A full collection walks every live object; with the imports of a service that is
    several hundred thousand objects, so each one under load stalls every request in
    flight. What a request allocates dies young, and reference counting frees almost
    all of it; the collector is only for cycles, which a larger threshold still finds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_GEN0, *gc.get_threshold()[1:])


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own event loop: the process's signal handlers stay ours."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT stop taking work; what is in hand finishes."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
