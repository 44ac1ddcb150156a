"""The RabbitMQ broker against a real server on loopback (`AIGEN_TEST_RABBITMQ_URL`).

Every test declares its own topology under a random namespace and deletes it afterwards,
so runs never see each other's messages. Delays are compressed: retry rungs of 50, 200
and 800 ms and a backoff base of 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq.channel
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from yarl import URL

from aigen.bootstrap import create_broker
from aigen.bus.broker import Retry
from aigen.bus.messages import (
    AIGenerationJobCompleted,
    AIGenerationJobFailed,
    AIGenerationJobRequested,
    Envelope,
)
from aigen.bus.rabbitmq import (
    ATTEMPTS_HEADER,
    CONTENT_TYPE,
    ERROR_HEADER,
    BrokerUnavailableError,
    RabbitMQBroker,
    UnroutableError,
    default_buckets,
    next_hop,
)
from aigen.bus.topology import BACKEND, EXCHANGE, NOTIFICATIONS, WORKFLOW, dead_letter_queue
from aigen.config import Settings
from aigen.db.session import create_engine, create_sessionmaker
from tests.fixtures.proxy import TcpProxy

RABBITMQ_URL = os.environ.get("AIGEN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
BUCKETS = (0.05, 0.2, 0.8)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def requested(job: str = "job-1") -> Envelope:
    message = AIGenerationJobRequested(job_id=job, account_id="acc", model="m", input={"p": 1})
    return Envelope.wrap(message, traceparent=TRACEPARENT)


def completed(job: str = "job-1") -> Envelope:
    message = AIGenerationJobCompleted(
        job_id=job, account_id="acc", attempt=0, assets=[], usage={"output_tokens": 3}
    )
    return Envelope.wrap(message)


def failed(job: str = "job-1") -> Envelope:
    error = {"code": "x", "message": "y", "retryable": False}
    return Envelope.wrap(
        AIGenerationJobFailed(job_id=job, account_id="acc", attempt=0, error=error)
    )


@dataclass
class Recorder:
    """A handler that records each call and lets a test script what it does."""

    behaviour: Callable[[Envelope, int], Awaitable[None]] | None = None
    calls: list[tuple[float, Envelope]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, envelope: Envelope) -> None:
        self.calls.append((time.monotonic(), envelope))
        self.changed.set()
        if self.behaviour is not None:
            await self.behaviour(envelope, len(self.calls))

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                self.changed.clear()
                await self.changed.wait()


class Consumer:
    """`broker.consume` running in a task until `stop()`."""

    def __init__(self, broker: RabbitMQBroker, queue: str, handler: Any, **options: Any) -> None:
        self.stop_event = asyncio.Event()
        options.setdefault("prefetch", 4)
        self.task = asyncio.create_task(
            broker.consume(queue, handler, stop=self.stop_event, **options)
        )

    async def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout)


def make_broker(namespace: str, url: str = RABBITMQ_URL, **options: Any) -> RabbitMQBroker:
    values: dict[str, Any] = {
        "namespace": namespace,
        "delivery_limit": 3,
        "retry_base": 0.05,
        "retry_max": 0.5,
        "retry_buckets": BUCKETS,
        "reconnect_delay": 0.1,
        "reconnect_max": 0.5,
        "connect_timeout": 2.0,
        "publish_timeout": 5.0,
    }
    values.update(options)
    return RabbitMQBroker(url, **values)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}."


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractConnection]:
    """A plain connection of the test's own, to look at queues from outside the broker."""
    try:
        connection = await aio_pika.connect(RABBITMQ_URL, timeout=2)
    except Exception as exc:
        if os.environ.get("CI"):
            # CI starts RabbitMQ (.ci/run): there, an unreachable server is a failure.
            pytest.fail(f"RabbitMQ is not reachable at {RABBITMQ_URL}: {exc!r}")
        pytest.skip(f"RabbitMQ is not reachable at {RABBITMQ_URL}: {exc!r}")
    yield connection
    await connection.close()


@pytest.fixture
async def channel(amqp: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    async with amqp.channel() as channel:
        yield channel


@pytest.fixture
async def broker(namespace: str, amqp: AbstractConnection) -> AsyncIterator[RabbitMQBroker]:
    broker = make_broker(namespace)
    await broker.start()
    yield broker
    await broker.aclose()
    async with amqp.channel() as channel:
        for queue in broker.queue_names():
            await channel.queue_delete(queue)
        for exchange in broker.exchange_names():
            await channel.exchange_delete(exchange)


async def get(
    channel: AbstractChannel, queue: str, timeout: float = 0.0
) -> AbstractIncomingMessage | None:
    """One message from `queue` (acked), waiting up to `timeout` seconds for it."""
    amqp_queue = await channel.get_queue(queue, ensure=False)
    deadline = time.monotonic() + timeout
    while True:
        message = await amqp_queue.get(no_ack=True, fail=False)
        if message is not None or time.monotonic() >= deadline:
            return message
        await asyncio.sleep(0.02)


async def drain(channel: AbstractChannel, queue: str) -> list[AbstractIncomingMessage]:
    messages = []
    while (message := await get(channel, queue)) is not None:
        messages.append(message)
    return messages


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def published(broker: RabbitMQBroker, envelope: Envelope) -> bool:
    """Publish as the outbox relay does: a failure means "try again later"."""
    try:
        await broker.publish([envelope])
    except (BrokerUnavailableError, UnroutableError):
        return False
    return True


def holding_first(release: asyncio.Event) -> Callable[[Envelope, int], Awaitable[None]]:
    """A `Recorder` behaviour: the first message stays in its handler until `release`."""

    async def behaviour(envelope: Envelope, call: int) -> None:
        if call == 1:
            await release.wait()

    return behaviour


@contextlib.asynccontextmanager
async def behind_a_proxy(namespace: str) -> AsyncIterator[tuple[TcpProxy, RabbitMQBroker]]:
    """A broker that reaches RabbitMQ through a proxy the test can cut."""
    rabbitmq = URL(RABBITMQ_URL)
    proxy = TcpProxy(rabbitmq.host or "127.0.0.1", rabbitmq.port or 5672)
    await proxy.start()
    flaky = make_broker(namespace, str(rabbitmq.with_port(proxy.port)))
    try:
        yield proxy, flaky
    finally:
        await flaky.aclose()
        await proxy.aclose()


def close_connection_on_server(name_part: str) -> None:
    """`rabbitmqctl close_connection` for each of our connections: a server-side close."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--silent"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    # Tab-separated; the JSON formatter prints pids in a form close_connection refuses.
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines() if name_part in line]
    assert pids, "the broker's connection was not found on the server"
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: forced close"],
            capture_output=True,
            check=True,
            timeout=30,
        )


class TestCreateBroker:
    def test_amqp_url_selects_rabbitmq(self) -> None:
        settings = Settings(
            broker_url="amqps://u:p@example.invalid/",
            rabbitmq_namespace="ns.",
            rabbitmq_retry_buckets=[1, 5],
        )
        broker = create_broker(settings, create_sessionmaker(create_engine("sqlite+aiosqlite://")))
        assert isinstance(broker, RabbitMQBroker)
        assert broker.queue_names()[-2:] == ["ns.aigen.retry.1000ms", "ns.aigen.retry.5000ms"]


class TestNextHop:
    def test_now(self) -> None:
        assert next_hop(0, BUCKETS) == (0, 0)
        assert next_hop(-1, BUCKETS) == (0, 0)

    def test_short_delay_rounds_up_to_smallest_rung(self) -> None:
        assert next_hop(0.01, BUCKETS) == (0.05, 0)

    def test_largest_fitting_rung_and_rest(self) -> None:
        bucket, rest = next_hop(1.0, BUCKETS)
        assert bucket == 0.8
        assert rest == pytest.approx(0.2)

    def test_small_rest_dropped(self) -> None:
        assert next_hop(0.22, BUCKETS) == (0.2, 0)

    def test_long_delay_hops_through_the_top_rung(self) -> None:
        delay, rungs = 3.0, []
        while delay > 0:
            bucket, delay = next_hop(delay, BUCKETS)
            rungs.append(bucket)
        assert rungs == [0.8, 0.8, 0.8, 0.2, 0.2, 0.2]

    def test_default_ladder(self) -> None:
        assert default_buckets(1.0, 300.0) == [0.25, 1, 4, 16, 64, 256]


@pytest.mark.rabbitmq
class TestPublish:
    async def test_message_properties(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        envelope = requested()
        await broker.publish([envelope])
        message = await get(channel, broker.namespace + WORKFLOW, timeout=5)
        assert message is not None
        assert message.message_id == envelope.id
        assert message.content_type == CONTENT_TYPE
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.routing_key == envelope.routing_key
        assert message.headers["traceparent"] == TRACEPARENT
        assert Envelope.from_json(message.body) == envelope

    async def test_routes_to_the_bound_queues(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        await broker.publish([requested("a"), completed("b"), failed("c")])
        ns = broker.namespace
        await asyncio.sleep(0.2)
        routed = {
            queue: sorted(
                Envelope.from_json(m.body).job_id for m in await drain(channel, ns + queue)
            )
            for queue in (WORKFLOW, BACKEND, NOTIFICATIONS)
        }
        assert routed == {WORKFLOW: ["a"], BACKEND: ["b", "c"], NOTIFICATIONS: ["b", "c"]}

    async def test_unroutable_raises(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        ns = broker.namespace
        workflow = await channel.get_queue(ns + WORKFLOW, ensure=False)
        await workflow.unbind(ns + EXCHANGE, requested().routing_key)
        with pytest.raises(UnroutableError):
            await broker.publish([requested()])
        # The publisher channel survives a returned message.
        await broker.publish([completed()])

    async def test_deleted_exchange_is_declared_again(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        await channel.exchange_delete(broker.namespace + EXCHANGE)
        with pytest.raises(BrokerUnavailableError):
            await broker.publish([requested()])
        await broker.publish([requested()])
        assert await get(channel, broker.namespace + WORKFLOW, timeout=5) is not None

    async def test_ping(self, broker: RabbitMQBroker) -> None:
        await broker.ping()
        await broker.aclose()
        with pytest.raises(BrokerUnavailableError):
            await broker.ping()


@pytest.mark.rabbitmq
class TestConsume:
    async def test_roundtrip_and_ack(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        handler = Recorder()
        consumer = Consumer(broker, WORKFLOW, handler)
        envelope = requested()
        await broker.publish([envelope])
        await handler.wait_for(1)
        await consumer.stop()
        assert handler.calls[0][1] == envelope
        # Acked: nothing is left, and nothing comes back.
        assert await get(channel, broker.namespace + WORKFLOW, timeout=0.3) is None

    async def test_unknown_queue(self, broker: RabbitMQBroker) -> None:
        with pytest.raises(ValueError, match="unknown queue"):
            await broker.consume("nope", Recorder(), stop=asyncio.Event(), prefetch=1)

    async def test_retry_waits_and_does_not_count(self, broker: RabbitMQBroker) -> None:
        # Three deliberate retries with a delivery limit of 3: never dead-lettered.
        async def behaviour(envelope: Envelope, call: int) -> None:
            if call <= 3:
                raise Retry(0.5 if call == 1 else 0.05)

        dead: list[str] = []

        async def on_dead_letter(envelope: Envelope, error: str) -> None:
            dead.append(error)

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler, on_dead_letter=on_dead_letter)
        await broker.publish([requested()])
        await handler.wait_for(4)
        await consumer.stop()
        waited = handler.calls[1][0] - handler.calls[0][0]
        # 0.5 s: the 200 ms rung twice, then the 50 ms rung twice.
        assert 0.35 <= waited <= 1.5
        assert dead == []

    async def test_poison_message_is_dead_lettered(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        async def behaviour(envelope: Envelope, call: int) -> None:
            raise RuntimeError(f"boom {call}")

        dead: list[tuple[Envelope, str]] = []
        hooked = asyncio.Event()

        async def on_dead_letter(envelope: Envelope, error: str) -> None:
            dead.append((envelope, error))
            hooked.set()

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler, on_dead_letter=on_dead_letter)
        envelope = requested()
        await broker.publish([envelope])
        await asyncio.wait_for(hooked.wait(), 10)
        await asyncio.sleep(0.5)  # nothing more happens to it
        await consumer.stop()
        assert len(handler.calls) == 3
        assert [(e.id, error) for e, error in dead] == [(envelope.id, "RuntimeError('boom 3')")]
        ns = broker.namespace
        message = await get(channel, ns + dead_letter_queue(WORKFLOW), timeout=2)
        assert message is not None
        assert message.message_id == envelope.id
        assert message.headers[ATTEMPTS_HEADER] == 3
        assert message.headers[ERROR_HEADER] == "RuntimeError('boom 3')"
        assert message.headers["traceparent"] == TRACEPARENT
        assert await get(channel, ns + WORKFLOW) is None

    async def test_backoff_between_failures(self, broker: RabbitMQBroker) -> None:
        async def behaviour(envelope: Envelope, call: int) -> None:
            if call < 3:
                raise RuntimeError("transient")

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested()])
        await handler.wait_for(3)
        await consumer.stop()
        first, second, third = (at for at, _ in handler.calls)
        # 50 ms, then 100 ms (±20 %), rounded to the 50 ms rung and parked.
        assert second - first >= 0.04
        assert third - second >= 0.08
        assert third - first < 2.0

    async def test_redeliveries_after_crashes_count(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        # Two consumers died holding the message (x-delivery-count 2): one failure left.
        await broker.publish([requested()])
        queue = await channel.get_queue(broker.namespace + WORKFLOW, ensure=False)
        for _ in range(2):
            message = await queue.get(fail=False, timeout=5)
            assert message is not None
            await message.nack(requeue=True)

        async def behaviour(envelope: Envelope, call: int) -> None:
            raise RuntimeError("still broken")

        dead: list[str] = []
        hooked = asyncio.Event()

        async def on_dead_letter(envelope: Envelope, error: str) -> None:
            dead.append(error)
            hooked.set()

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler, on_dead_letter=on_dead_letter)
        await asyncio.wait_for(hooked.wait(), 10)
        await consumer.stop()
        assert len(handler.calls) == 1
        assert dead == ["RuntimeError('still broken')"]

    async def test_server_delivery_limit_dead_letters(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        # A message that kills every consumer: the queue's own x-delivery-limit (3) ends it.
        envelope = requested()
        await broker.publish([envelope])
        ns = broker.namespace
        queue = await channel.get_queue(ns + WORKFLOW, ensure=False)
        returns = 0
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await message.nack(requeue=True)
            returns += 1
        assert returns == 4
        dead = await get(channel, ns + dead_letter_queue(WORKFLOW), timeout=5)
        assert dead is not None
        assert dead.message_id == envelope.id
        assert dead.headers["x-first-death-reason"] == "delivery_limit"

    async def test_lost_retry_queue_hands_the_message_back(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        # Parking fails (the 50 ms retry queue is gone): the message is returned rather
        # than held, and the queue's delivery limit ends the loop in the dead-letter queue.
        ns = broker.namespace
        await channel.queue_delete(f"{ns}aigen.retry.50ms")

        async def behaviour(envelope: Envelope, call: int) -> None:
            raise Retry(0.01)

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested()])
        dead = await get(channel, ns + dead_letter_queue(WORKFLOW), timeout=10)
        await consumer.stop()
        assert dead is not None
        assert dead.headers["x-first-death-reason"] == "delivery_limit"
        assert len(handler.calls) == 4

    async def test_malformed_message_is_dead_lettered(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        handler = Recorder()
        consumer = Consumer(broker, WORKFLOW, handler)
        ns = broker.namespace
        await channel.default_exchange.publish(aio_pika.Message(b"not json"), ns + WORKFLOW)
        dead = await get(channel, ns + dead_letter_queue(WORKFLOW), timeout=5)
        await consumer.stop()
        assert dead is not None
        assert dead.body == b"not json"
        assert handler.calls == []

    async def test_prefetch_bounds_messages_in_hand(self, broker: RabbitMQBroker) -> None:
        release = asyncio.Event()

        async def behaviour(envelope: Envelope, call: int) -> None:
            await release.wait()

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler, prefetch=2)
        await broker.publish([requested(f"j{i}") for i in range(5)])
        await handler.wait_for(2)
        await asyncio.sleep(0.3)
        assert len(handler.calls) == 2
        release.set()
        await handler.wait_for(5)
        await consumer.stop()

    async def test_aclose_ends_consume(self, broker: RabbitMQBroker) -> None:
        handler = Recorder()
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested()])
        await handler.wait_for(1)
        await broker.aclose()
        await asyncio.wait_for(consumer.task, 5)

    async def test_stop_finishes_in_flight_then_returns(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        finished: list[str] = []

        async def behaviour(envelope: Envelope, call: int) -> None:
            await asyncio.sleep(0.5)
            finished.append(envelope.job_id)

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested("a")])
        await handler.wait_for(1)
        consumer.stop_event.set()
        await asyncio.sleep(0.1)  # the subscription is cancelled by now
        await broker.publish([requested("b")])
        await consumer.stop()
        assert finished == ["a"]
        # "a" was acked after its handler finished; "b" was never taken.
        left = await drain(channel, broker.namespace + WORKFLOW)
        assert [Envelope.from_json(m.body).job_id for m in left] == ["b"]


@pytest.fixture
def ack_frames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every `basic.ack` this process writes, as (delivery tag, multiple): the real client
    is called through, only watched."""
    frames: list[tuple[int, bool]] = []
    real = aiormq.channel.Channel.basic_ack

    async def basic_ack(
        self: aiormq.channel.Channel, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> None:
        frames.append((delivery_tag, multiple))
        await real(self, delivery_tag, multiple, wait)

    monkeypatch.setattr(aiormq.channel.Channel, "basic_ack", basic_ack)
    return frames


@pytest.mark.rabbitmq
class TestAcks:
    async def test_handlers_that_end_together_ack_in_one_frame(
        self, broker: RabbitMQBroker, channel: AbstractChannel, ack_frames: list[tuple[int, bool]]
    ) -> None:
        # As a group commit resumes the handlers of its batch: all in one turn of the loop.
        together = asyncio.Event()

        async def behaviour(envelope: Envelope, call: int) -> None:
            if call == 8:
                together.set()
            await together.wait()

        handler = Recorder(behaviour)
        consumer = Consumer(broker, WORKFLOW, handler, prefetch=8)
        await broker.publish([requested(f"j{i}") for i in range(8)])
        await handler.wait_for(8)
        await consumer.stop()
        assert ack_frames == [(8, True)]
        # All eight were settled: nothing is left, and nothing comes back.
        assert await get(channel, broker.namespace + WORKFLOW, timeout=0.3) is None

    async def test_a_slow_handler_holds_back_no_other_ack(self, broker: RabbitMQBroker) -> None:
        release = asyncio.Event()
        handler = Recorder(holding_first(release))
        consumer = Consumer(broker, WORKFLOW, handler, prefetch=2)
        try:
            await broker.publish([requested(f"j{i}") for i in range(5)])
            # With two messages in hand and the first held, each of the others can only
            # arrive once the one before it was acked.
            await handler.wait_for(5)
        finally:
            release.set()
            await consumer.stop()

    async def test_an_ack_never_covers_a_message_still_in_hand(
        self, namespace: str, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        release = asyncio.Event()
        handler = Recorder(holding_first(release))
        async with behind_a_proxy(namespace) as (proxy, flaky):
            consumer = Consumer(flaky, WORKFLOW, handler, prefetch=4)
            try:
                await broker.publish([requested("held")])
                await handler.wait_for(1)
                await broker.publish([requested(f"j{i}") for i in range(3)])
                await handler.wait_for(4)
                await asyncio.sleep(0.3)  # their acks are written
                # The link dies while the first message is still in its handler.
                proxy.set("refuse")
                release.set()
                await asyncio.sleep(0.5)
                proxy.set("forward")
                # Only the message that was in hand comes back: the acks of the three after
                # it did not cover it.
                await handler.wait_for(5)
                await asyncio.sleep(0.5)
                await consumer.stop()
            finally:
                release.set()
                if not consumer.task.done():
                    await consumer.stop()
        jobs = [envelope.job_id for _, envelope in handler.calls]
        assert jobs == ["held", "j0", "j1", "j2", "held"]
        assert await get(channel, broker.namespace + WORKFLOW, timeout=0.3) is None


@pytest.mark.rabbitmq
class TestReconnect:
    async def test_server_closes_the_connection(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not installed here")
        handler = Recorder()
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested("before")])
        await handler.wait_for(1)
        try:
            # In a thread: rabbitmqctl takes a second or two, and the loop must keep running.
            await asyncio.to_thread(close_connection_on_server, broker.namespace)
        except (subprocess.CalledProcessError, PermissionError) as exc:
            await consumer.stop()
            pytest.skip(f"rabbitmqctl cannot close connections here: {exc!r}")
        # A publish racing the close may fail (the outbox relay publishes again); the next
        # one reconnects. The consumer took up its queue again by itself.
        await eventually(lambda: published(broker, requested("after")))
        await handler.wait_for(2)
        await consumer.stop()
        assert [envelope.job_id for _, envelope in handler.calls] == ["before", "after"]
        assert await get(channel, broker.namespace + WORKFLOW, timeout=0.3) is None

    async def test_network_drop_mid_handler(
        self, namespace: str, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        release = asyncio.Event()
        handler = Recorder(holding_first(release))
        async with behind_a_proxy(namespace) as (proxy, flaky):
            consumer = Consumer(flaky, WORKFLOW, handler)
            try:
                await broker.publish([requested("held")])
                await handler.wait_for(1)
                # The link dies while the handler holds the message, and stays down a while.
                proxy.set("refuse")
                with pytest.raises(BrokerUnavailableError):
                    await flaky.publish([requested("lost")])
                with pytest.raises(BrokerUnavailableError):
                    await flaky.ping()
                release.set()
                await asyncio.sleep(0.5)
                proxy.set("forward")
                # Not acked before the handler finished, so the server hands it out again;
                # the reconnected consumer gets it, then new messages.
                await handler.wait_for(2)
                await flaky.ping()
                await flaky.publish([requested("after")])
                await handler.wait_for(3)
                await consumer.stop()
            finally:
                release.set()
                if not consumer.task.done():
                    await consumer.stop()
        jobs = [envelope.job_id for _, envelope in handler.calls]
        assert jobs == ["held", "held", "after"]
        assert await get(channel, broker.namespace + WORKFLOW, timeout=0.3) is None

    async def test_consumer_cancelled_by_server_resubscribes(
        self, broker: RabbitMQBroker, channel: AbstractChannel
    ) -> None:
        handler = Recorder()
        consumer = Consumer(broker, WORKFLOW, handler)
        await broker.publish([requested("before")])
        await handler.wait_for(1)
        # Deleting the queue cancels its consumers; connect_robust would not come back.
        await channel.queue_delete(broker.namespace + WORKFLOW)

        await eventually(lambda: published(broker, requested("after")))
        await handler.wait_for(2)
        await consumer.stop()
        assert [envelope.job_id for _, envelope in handler.calls] == ["before", "after"]
