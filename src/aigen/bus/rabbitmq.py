"""The `rabbitmq` broker: DESIGN §5's topology on a RabbitMQ 3.10+ server, through aio-pika.

Topology (every name prefixed by `namespace`, empty in production):

- `aigen.events`, a durable topic exchange; the durable quorum queues `aigen.workflow`,
  `aigen.backend` and `aigen.notifications` are bound to it as `topology.BINDINGS` says.
  Each has an explicit `x-delivery-limit` and dead-letters through `aigen.events.dlx`
  (direct) into its own `<queue>.dlq` (quorum).
- Delays: `aigen.events.retry`, a headers exchange, feeds a ladder of quorum queues
  `aigen.retry.<ms>ms`, each with one fixed `x-message-ttl`. A message expires at the
  head of its queue and is dead-lettered (`at-least-once`) through the default exchange
  back to the queue named by its routing key. One TTL per queue keeps expiry in FIFO
  order (RabbitMQ expires per-message TTLs only at the head), so the ladder serves every
  consumer queue. A delay longer than a rung hops: `x-aigen-delay-ms` carries what is
  left and the consumer re-parks the message instead of handling it (`next_hop`).

Delivery: publishers wait for publisher confirms and publish `mandatory`, so an
unroutable event is an error, never silently dropped. Consumers ack by hand once the
handler (which commits its own transaction) returns; the acks of handlers that end in
the same turn of the loop share a frame where they can (`acks.Settler`). A handler's
`Retry` re-parks the message for its delay and acks the original, so it does not count
toward any limit; any other error re-parks it with exponential backoff, counting
failures in `x-aigen-attempts` (plus the quorum queue's `x-delivery-count`, the
redeliveries after a consumer died), and at `delivery_limit` the message is published to
the queue's `.dlq` and `on_dead_letter` is called. A message that keeps killing its
consumer never reaches our code a last time: the queue's own `x-delivery-limit` moves it
to the `.dlq` (reason `delivery_limit`) without the hook.

Connections: one connection per broker, shared by the publisher channel and one channel
per `consume` call. aio-pika's `connect_robust` is not used: its restoration misses
consumers in known cases (consumers cancelled by the server, objects only held weakly;
mosquito/aio-pika#334, #536, #626). Instead every `consume` call supervises its own
channel: when the channel or the connection dies, or the server cancels the consumer,
it reconnects with backoff, declares the topology again and subscribes again.

Errors: BrokerError → {BrokerUnavailableError, UnroutableError, NotConfirmedError}.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.common import Arguments, FieldValue
from yarl import URL

from aigen.aio import sleep_or_stop

from .acks import Settler
from .broker import DeadLetterHook, Handler, Retry
from .messages import Envelope
from .topology import BINDINGS, EXCHANGE, dead_letter_queue

log = structlog.get_logger(__name__)

DEAD_LETTER_EXCHANGE = f"{EXCHANGE}.dlx"
RETRY_EXCHANGE = f"{EXCHANGE}.retry"
# CloudEvents AMQP binding, structured mode.
CONTENT_TYPE = "application/cloudevents+json"

ATTEMPTS_HEADER = "x-aigen-attempts"
# Not `x-`: the headers exchange ignores `x-` headers when it matches bindings.
BUCKET_HEADER = "aigen-retry-bucket"
DELAY_HEADER = "x-aigen-delay-ms"
ERROR_HEADER = "x-aigen-error"
# Set by quorum queues: how often this copy was returned (consumer died, channel closed).
DELIVERY_COUNT_HEADER = "x-delivery-count"
_MAX_ERROR_CHARS = 1000


class BrokerError(Exception):
    """Root of the RabbitMQ adapter's errors."""


class BrokerUnavailableError(BrokerError):
    """The server cannot be reached, or the connection or channel was lost mid-call."""


class UnroutableError(BrokerError):
    """The server returned a `mandatory` message: no queue is bound for its routing key."""


class NotConfirmedError(BrokerError):
    """The server refused (nack) a message, or did not confirm it in time."""


def default_buckets(retry_base: float, retry_max: float) -> list[float]:
    """The retry ladder: `retry_base / 4` times powers of 4, up to `retry_max`.

    With the defaults (1 s, 300 s): 0.25, 1, 4, 16, 64 and 256 s, six queues. The
    quarter rung keeps short deliberate `Retry`s (the notifier's 0.2 s) short.
    """
    buckets: list[float] = []
    bucket = retry_base / 4
    while bucket <= retry_max:
        buckets.append(bucket)
        bucket *= 4
    return buckets or [retry_max]


def next_hop(delay: float, buckets: Sequence[float]) -> tuple[float, float]:
    """Which rung to park a message in for `delay` seconds, and what is left after it.

    `(0, 0)` means deliver now. The largest rung that fits is taken; a rest shorter than
    half the smallest rung is dropped, and a delay shorter than the smallest rung is
    rounded up to it: the error is at most one smallest rung.
    """
    if delay <= 0:
        return 0.0, 0.0
    smallest = min(buckets)
    fitting = [bucket for bucket in buckets if bucket <= delay]
    if not fitting:
        return smallest, 0.0
    bucket = max(fitting)
    rest = delay - bucket
    return bucket, rest if rest >= smallest / 2 else 0.0


class _Outcome(enum.Enum):
    STOPPED = "stopped"
    LOST = "lost"
    CANCELED = "canceled"


@dataclass(slots=True)
class _Session:
    """One channel consuming one queue, with the exchanges its retries publish to."""

    name: str
    channel: AbstractChannel
    default: AbstractExchange
    retry: AbstractExchange
    dead: AbstractExchange
    handler: Handler
    on_dead_letter: DeadLetterHook | None
    # The channel's acks, nacks and rejects: a turn's acks go in one frame where they can.
    settler: Settler
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class RabbitMQBroker:
    """A broker on a RabbitMQ server (DESIGN §5); see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "",
        delivery_limit: int = 5,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        retry_buckets: Sequence[float] | None = None,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
        reconnect_delay: float = 0.5,
        reconnect_max: float = 15.0,
    ) -> None:
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        buckets = list(retry_buckets or default_buckets(retry_base, retry_max))
        if not buckets or min(buckets) <= 0:
            raise ValueError("retry buckets must be positive")
        self._url = url
        self.namespace = namespace
        self._limit = delivery_limit
        self._retry_base = retry_base
        self._retry_max = retry_max
        # Whole milliseconds: the TTL and the queue name must agree exactly.
        self._buckets_ms = sorted({max(1, round(bucket * 1000)) for bucket in buckets})
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._reconnect_delay = reconnect_delay
        self._reconnect_max = reconnect_max
        self._connection_name = f"aigen {namespace or '-'} {socket.gethostname()}:{os.getpid()}"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        # Set when a publish met a missing exchange: declare again on the next channel.
        self._redeclare = False

    # Names -----------------------------------------------------------------------------

    def _name(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def _bucket_queue(self, bucket_ms: int) -> str:
        return self._name(f"aigen.retry.{bucket_ms}ms")

    def queue_names(self) -> list[str]:
        """Every queue this broker declares, namespace included."""
        names = [self._name(queue) for queue in BINDINGS]
        names += [self._name(dead_letter_queue(queue)) for queue in BINDINGS]
        return names + [self._bucket_queue(bucket) for bucket in self._buckets_ms]

    def exchange_names(self) -> list[str]:
        """Every exchange this broker declares, namespace included."""
        return [self._name(name) for name in (EXCHANGE, DEAD_LETTER_EXCHANGE, RETRY_EXCHANGE)]

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and declare the topology; raises `BrokerUnavailableError` if it cannot."""
        await self._publisher()

    async def ping(self) -> None:
        """Raise unless the server answers; reconnects first when the connection was lost.

        An idle API process has nothing else that would notice a lost connection and
        reconnect, so readiness itself heals it.
        """
        channel = await self._publisher()
        try:
            await channel.declare_exchange(
                self._name(EXCHANGE), aio_pika.ExchangeType.TOPIC, durable=True
            )
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailableError(f"RabbitMQ did not answer: {exc!r}") from exc

    async def aclose(self) -> None:
        """Close the channels and the connection; running `consume` calls then return."""
        self._closing = True
        async with self._lock:
            await self._discard()

    async def _publisher(self) -> AbstractChannel:
        """The shared connection's publisher channel, reconnecting when either was lost.

        A new connection declares the whole topology first: after a server restart or a
        deleted queue, the first publish or subscription puts it back.
        """
        async with self._lock:
            if self._closing:
                raise BrokerUnavailableError("the broker was closed")
            if self._connection is None or not _alive(self._connection):
                await self._discard()
                connection = await self._connect()
                try:
                    channel = await self._open_channel(connection)
                    await self._declare(channel)
                except BaseException:
                    await connection.close()
                    raise
                connection.close_callbacks.add(self._on_connection_closed)
                self._connection, self._channel = connection, channel
                log.info("rabbitmq.connected", url=_redacted(self._url), namespace=self.namespace)
            elif self._channel is None or self._channel.is_closed:
                self._channel = await self._open_channel(self._connection)
                if self._redeclare:
                    await self._declare(self._channel)
                    self._redeclare = False
            assert self._channel is not None
            return self._channel

    async def _connect(self) -> AbstractConnection:
        try:
            return await aio_pika.connect(
                self._url,
                timeout=self._connect_timeout,
                client_properties={"connection_name": self._connection_name},
            )
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailableError(
                f"cannot connect to RabbitMQ at {_redacted(self._url)}: {exc!r}"
            ) from exc

    async def _open_channel(self, connection: AbstractConnection) -> AbstractChannel:
        try:
            # `on_return_raises`: a returned mandatory message fails its publish call.
            channel = connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.initialize(timeout=self._connect_timeout)
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailableError(f"cannot open a RabbitMQ channel: {exc!r}") from exc
        return channel

    def _on_connection_closed(self, _: object, exc: BaseException | None) -> None:
        if not self._closing:
            log.warning("rabbitmq.connection_lost", error=repr(exc))

    async def _discard(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _declare(self, channel: AbstractChannel) -> None:
        """Declare the whole topology; idempotent, so done on every (re)connection."""
        try:
            events = await channel.declare_exchange(
                self._name(EXCHANGE), aio_pika.ExchangeType.TOPIC, durable=True
            )
            dead = await channel.declare_exchange(
                self._name(DEAD_LETTER_EXCHANGE), aio_pika.ExchangeType.DIRECT, durable=True
            )
            retry = await channel.declare_exchange(
                self._name(RETRY_EXCHANGE), aio_pika.ExchangeType.HEADERS, durable=True
            )
            for queue, keys in BINDINGS.items():
                name = self._name(queue)
                consumer_queue = await channel.declare_queue(
                    name,
                    durable=True,
                    arguments={
                        "x-queue-type": "quorum",
                        "x-delivery-limit": self._limit,
                        "x-dead-letter-exchange": dead.name,
                        "x-dead-letter-routing-key": name,
                    },
                )
                for key in keys:
                    await consumer_queue.bind(events, key)
                dlq = await channel.declare_queue(
                    self._name(dead_letter_queue(queue)),
                    durable=True,
                    arguments={"x-queue-type": "quorum"},
                )
                await dlq.bind(dead, name)
            for bucket in self._buckets_ms:
                rung = await channel.declare_queue(
                    self._bucket_queue(bucket), durable=True, arguments=_rung_arguments(bucket)
                )
                # Strings: the headers exchange compares values with their AMQP types.
                await rung.bind(retry, "", arguments={"x-match": "all", BUCKET_HEADER: str(bucket)})
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            # Most often PRECONDITION_FAILED: a queue exists with other arguments (e.g. a
            # changed delivery limit); RabbitMQ cannot change them in place.
            raise BrokerError(f"declaring the RabbitMQ topology failed: {exc!r}") from exc

    # Publishing ------------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish to `aigen.events`; returns once the server has confirmed every message.

        Raises `UnroutableError` when no queue is bound for an event's routing key,
        `NotConfirmedError` on a nack or a confirm timeout, `BrokerUnavailableError` when
        the connection is down; any of them may leave part of the batch published (the
        outbox relay publishes it again, and consumers deduplicate by event id).
        """
        if not envelopes:
            return
        channel = await self._publisher()
        exchange = await channel.get_exchange(self._name(EXCHANGE), ensure=False)
        if len(envelopes) == 1:
            # The common case of a process publishing its own commit: no task to gather.
            [envelope] = envelopes
            await self._send(exchange, _message(envelope), envelope.routing_key)
            return
        results = await asyncio.gather(
            *(
                self._send(exchange, _message(envelope), envelope.routing_key)
                for envelope in envelopes
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send(self, exchange: AbstractExchange, message: aio_pika.Message, key: str) -> None:
        try:
            await exchange.publish(message, key, mandatory=True, timeout=self._publish_timeout)
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {key!r} on exchange {exchange.name!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise NotConfirmedError(f"RabbitMQ refused the message: {exc!r}") from exc
        except TimeoutError as exc:
            raise NotConfirmedError("RabbitMQ did not confirm the message in time") from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            # The exchange was deleted under us; the server closed the channel.
            self._redeclare = True
            raise BrokerUnavailableError(f"publishing failed: {exc!r}") from exc
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailableError(f"publishing failed: {exc!r}") from exc

    # Consuming -------------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        stop: asyncio.Event,
        prefetch: int,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        """Run `handler` on `queue`'s messages until `stop` is set, then finish in hand.

        Survives lost connections and server-side consumer cancellations: it reconnects
        with backoff and subscribes again. Returns when `stop` is set (after cancelling
        the subscription and acking what was in hand) or after `aclose`.
        """
        if queue not in BINDINGS:
            raise ValueError(f"unknown queue {queue!r}; expected one of {sorted(BINDINGS)}")
        tasks: set[asyncio.Task[None]] = set()
        delay = self._reconnect_delay
        redeclare = False
        try:
            while not stop.is_set() and not self._closing:
                try:
                    outcome = await self._consume_once(
                        queue, handler, on_dead_letter, stop, prefetch, tasks, redeclare=redeclare
                    )
                except Exception as exc:
                    log.warning("rabbitmq.consume_failed", queue=queue, error=repr(exc))
                    await sleep_or_stop(stop, delay)
                    delay = min(self._reconnect_max, delay * 2)
                    continue
                if outcome is _Outcome.STOPPED or self._closing:
                    break
                # It was up: start the backoff over. After a cancel (the queue was
                # deleted, say) declare everything again before subscribing.
                delay = self._reconnect_delay
                redeclare = outcome is _Outcome.CANCELED
                log.warning("rabbitmq.consumer_interrupted", queue=queue, reason=outcome.value)
                await sleep_or_stop(stop, delay)
        finally:
            # Handlers of a lost channel still run to the end: their commits stand, and
            # the server redelivers those messages (the inbox makes that a no-op).
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _consume_once(
        self,
        queue: str,
        handler: Handler,
        on_dead_letter: DeadLetterHook | None,
        stop: asyncio.Event,
        prefetch: int,
        tasks: set[asyncio.Task[None]],
        *,
        redeclare: bool,
    ) -> _Outcome:
        await self._publisher()
        connection = self._connection
        if connection is None:
            raise BrokerUnavailableError("the connection was lost")
        channel = await self._open_channel(connection)
        try:
            if redeclare:
                await self._declare(channel)
            await channel.set_qos(prefetch_count=prefetch)
            underlay = await channel.get_underlay_channel()
            session = _Session(
                name=self._name(queue),
                channel=channel,
                default=channel.default_exchange,
                retry=await channel.get_exchange(self._name(RETRY_EXCHANGE), ensure=False),
                dead=await channel.get_exchange(self._name(DEAD_LETTER_EXCHANGE), ensure=False),
                handler=handler,
                on_dead_letter=on_dead_letter,
                settler=Settler(underlay),
            )
            canceled = asyncio.Event()
            underlay.on_consumer_cancel_callbacks.add(lambda _frame: canceled.set())

            async def on_message(message: AbstractIncomingMessage) -> None:
                session.settler.received(_tag(message))
                task = asyncio.create_task(self._handle(session, message))
                for owner in (tasks, session.tasks):
                    owner.add(task)
                    task.add_done_callback(owner.discard)

            amqp_queue = await channel.get_queue(session.name, ensure=False)
            tag = await amqp_queue.consume(on_message)
            log.info("rabbitmq.consuming", queue=session.name, prefetch=prefetch)
            outcome = await _wait_first(stop, channel, canceled)
            if outcome is _Outcome.STOPPED and not channel.is_closed:
                # No new deliveries; those already sent before CancelOk are in `tasks`.
                with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await amqp_queue.cancel(tag)
            if session.tasks and not channel.is_closed:
                # Their acks need this channel open.
                await asyncio.gather(*session.tasks, return_exceptions=True)
            return outcome
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _handle(self, session: _Session, message: AbstractIncomingMessage) -> None:
        """Run the handler on one delivery, then ack, re-park or dead-letter it."""
        try:
            headers = message.headers or {}
            rest_ms = _int(headers.get(DELAY_HEADER))
            if rest_ms > 0:
                # Still parked: hop to the next rung without waking the handler.
                await self._park(
                    session, message, rest_ms / 1000, _int(headers.get(ATTEMPTS_HEADER))
                )
                await session.settler.ack(_tag(message))
                return
            try:
                envelope = Envelope.from_json(message.body)
            except (ValueError, KeyError, TypeError) as exc:
                # Malformed: no retry can help. The queue's DLX moves it to the `.dlq`.
                log.error("rabbitmq.malformed_message", queue=session.name, error=repr(exc))
                await session.settler.reject(_tag(message), requeue=False)
                return
            await self._run(session, message, envelope, headers)
        except Exception as exc:
            log.warning(
                "rabbitmq.settle_failed",
                queue=session.name,
                message_id=message.message_id,
                error=repr(exc),
            )
            # A lost channel returns the message by itself. On a live one (a retry queue
            # deleted, say) hand it back rather than hold it, and a prefetch slot, forever:
            # the return counts toward the queue's delivery limit.
            if not session.channel.is_closed and session.settler.holds(_tag(message)):
                with contextlib.suppress(Exception):
                    await session.settler.nack(_tag(message), requeue=True)

    async def _run(
        self,
        session: _Session,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        headers: Mapping[str, FieldValue],
    ) -> None:
        # Failures so far: those recorded on re-parked copies, plus the returns of this
        # copy (its consumer died or lost its channel while holding it).
        failures = _int(headers.get(ATTEMPTS_HEADER)) + _int(headers.get(DELIVERY_COUNT_HEADER))
        try:
            await session.handler(envelope)
        except Retry as retry:
            # A deliberate retry is not a failure: it does not count toward the limit.
            await self._park(session, message, retry.delay, failures)
        except Exception as exc:
            attempts = failures + 1
            log.warning(
                "rabbitmq.handler_failed",
                queue=session.name,
                event_id=envelope.id,
                job_id=envelope.data.get("job_id"),
                attempts=attempts,
                error=repr(exc),
            )
            if attempts >= self._limit:
                await self._dead_letter(session, message, envelope, repr(exc), attempts)
                return
            delay = min(self._retry_max, self._retry_base * 2 ** (attempts - 1))
            await self._park(session, message, delay * random.uniform(0.8, 1.2), attempts)
        await session.settler.ack(_tag(message))

    async def _park(
        self, session: _Session, message: AbstractIncomingMessage, delay: float, attempts: int
    ) -> None:
        """Publish a copy to wait `delay` seconds (confirmed), before the caller acks."""
        bucket, rest = next_hop(delay, [ms / 1000 for ms in self._buckets_ms])
        headers = _carried(message.headers) | {ATTEMPTS_HEADER: attempts}
        if bucket == 0:
            await self._send(session.default, _copy(message, headers), session.name)
            return
        headers |= {
            BUCKET_HEADER: str(round(bucket * 1000)),
            DELAY_HEADER: round(rest * 1000),
        }
        await self._send(session.retry, _copy(message, headers), session.name)

    async def _dead_letter(
        self,
        session: _Session,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        error: str,
        attempts: int,
    ) -> None:
        headers = _carried(message.headers) | {
            ATTEMPTS_HEADER: attempts,
            ERROR_HEADER: error[:_MAX_ERROR_CHARS],
        }
        await self._send(session.dead, _copy(message, headers), session.name)
        await session.settler.ack(_tag(message))
        log.error("rabbitmq.dead_lettered", queue=session.name, event_id=envelope.id, error=error)
        if session.on_dead_letter is not None:
            try:
                await session.on_dead_letter(envelope, error)
            except Exception:
                # The message stays in the dead-letter queue for an operator to replay.
                log.exception("rabbitmq.dead_letter_hook_failed", event_id=envelope.id)


async def _wait_first(
    stop: asyncio.Event, channel: AbstractChannel, canceled: asyncio.Event
) -> _Outcome:
    waiters = {
        asyncio.ensure_future(stop.wait()): _Outcome.STOPPED,
        asyncio.ensure_future(channel.closed()): _Outcome.LOST,
        asyncio.ensure_future(canceled.wait()): _Outcome.CANCELED,
    }
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    # Stop wins a tie: the caller then finishes in hand rather than resubscribing.
    if stop.is_set():
        return _Outcome.STOPPED
    return next(waiters[waiter] for waiter in done)


def _rung_arguments(bucket_ms: int) -> Arguments:
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": bucket_ms,
        # "" is the default exchange: the routing key, the target queue's name, routes it.
        "x-dead-letter-exchange": "",
        # At-least-once dead-lettering (3.10+) needs reject-publish overflow; without it
        # a message expiring while the target is unavailable could be lost.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _message(envelope: Envelope) -> aio_pika.Message:
    headers: dict[str, FieldValue] = {}
    if envelope.traceparent:
        headers["traceparent"] = envelope.traceparent
    return aio_pika.Message(
        envelope.to_json().encode(),
        message_id=envelope.id,
        type=envelope.type,
        timestamp=envelope.time,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )


def _copy(message: AbstractIncomingMessage, headers: dict[str, FieldValue]) -> aio_pika.Message:
    timestamp = message.timestamp if isinstance(message.timestamp, datetime) else None
    return aio_pika.Message(
        message.body,
        message_id=message.message_id,
        type=message.type,
        timestamp=timestamp,
        content_type=message.content_type or CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )


def _carried(headers: Mapping[str, FieldValue] | None) -> dict[str, FieldValue]:
    """The application's headers (`traceparent` …), without RabbitMQ's and our own."""
    return {
        key: value
        for key, value in (headers or {}).items()
        if not key.startswith("x-") and key != BUCKET_HEADER
    }


def _tag(message: AbstractIncomingMessage) -> int:
    # Set on every message a consumer receives (only `basic.get`'s may lack one).
    assert message.delivery_tag is not None
    return message.delivery_tag


def _int(value: object) -> int:
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str | bytes):
        with contextlib.suppress(ValueError):
            return int(value)
    return 0


def _alive(connection: AbstractConnection) -> bool:
    # `is_closed` stays False after the server or the network drops the connection;
    # the transport's own state tells.
    transport = connection.transport
    return not connection.is_closed and transport is not None and not transport.connection.is_closed


def _redacted(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url
