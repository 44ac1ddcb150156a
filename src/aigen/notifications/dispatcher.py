"""The notifier's loop: claim due webhook deliveries and make their attempts, concurrently.

Per attempt: build the payload in a fresh, short session (`payload_builder`), serialise it
compactly (under 20 KB), sign it with every secret in force, POST it through the SSRF
guard, store the attempt, then settle the delivery. A new delivery's first attempt is
usually handed over by the handler of the same process instead (`reserve`, `hand`),
leased and prepared in the transaction that created it:

- 2xx: `delivered`. 410: `failed`, and an endpoint is disabled.
- anything else (3xx included): the next attempt is scheduled by `schedule.next_delay`,
  or the delivery is `failed` when the schedule is exhausted; an endpoint failing for
  longer than `webhook_disable_after_seconds` is disabled.

No database transaction stays open across the HTTP call (SQLite holds its write lock for
the whole of a transaction). The schedule lives in the database, so a restarted notifier
picks up where the last one stopped.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.base import table
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, WebhookAttempt, WebhookDelivery, WebhookEndpoint

from . import metrics, repository, sender
from .schedule import next_delay
from .service import DELIVERED, FAILED, PENDING
from .signing import sign_headers
from .ssrf import Resolver

PayloadBuilder = Callable[[AsyncSession, WebhookDelivery], Awaitable[dict[str, Any]]]
HttpClientFactory = Callable[[], aiohttp.ClientSession]

MAX_PAYLOAD_BYTES = 20 * 1024
# The loop's poll when nothing is known to be due: twenty `poll_interval_seconds`, at
# most a second (a second at the default 0.05), rather than twenty claims a second on an
# idle system. A retry scheduled here wakes it at its time, plus a margin for the clocks.
IDLE_POLL_SECONDS = 1.0
IDLE_POLL_FACTOR = 20
RETRY_WAKE_MARGIN_SECONDS = 0.005
# An attempt's record (its row, the delivery's new state) waits this long for others to
# share its transaction. The webhook has been answered by then, so no one waits for the
# record but a reader of the delivery log; below the maximum each record was a
# transaction of its own, a sixth of a job's. A crash in that time sends the webhook
# again once the lease runs out, as a crash during the attempt does (at least once).
# (The notifier on SQLite does without: `runtime.run_notifier`.)
SETTLE_LINGER_SECONDS = 0.05

# Built once (see `db.base.table`): every attempt writes one.
_ADD_ATTEMPT = insert(table(WebhookAttempt))
# The outcome of an attempt that outlived its claim (`_record`).
SUPERSEDED = "superseded"
# An attempt's (planned status, outcome, next attempt at), once recorded.
Settled = tuple[str, str, datetime | None]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Prepared:
    """What one attempt sends, or (`unsendable`) why it cannot be sent."""

    endpoint_id: str | None
    url: str = ""
    secrets: list[str] = field(default_factory=list)
    body: bytes = b""
    unsendable: sender.AttemptResult | None = None
    final: bool = False


class Dispatcher:
    """Delivers due webhooks; run one or several per deployment (they never collide)."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        *,
        payload_builder: PayloadBuilder,
        http_client_factory: HttpClientFactory | None = None,
        concurrency: int = 16,
        https_only: bool = False,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        settle_linger: float = SETTLE_LINGER_SECONDS,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._sessionmaker = sessionmaker
        self._settings = settings
        self._payload_builder = payload_builder
        self._clients = sender.Clients(
            http_client_factory or (lambda: sender.default_http_client(settings)),
            linger_seconds=settings.webhook_timeout_seconds + 1,
        )
        self._concurrency = concurrency
        self._https_only = https_only
        self._resolver = resolver
        self._rng = rng
        self._wakeup = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        # Slots promised to deliveries being handed over (`reserve`, then `hand`).
        self._reserved = 0
        self._running = False
        # The attempts that end together are recorded in one transaction; an attempt
        # waiting for its record holds no slot (`_free`), up to `concurrency` of them.
        self._settlements = GroupCommit(sessionmaker, linger=settle_linger)
        self._settling = 0
        # Set by `run` while more deliveries are due than it had slots for.
        self._more_due = False

    def wake(self) -> None:
        """New deliveries are due (enqueued in this process): claim now, not at the poll."""
        self._wakeup.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP clients (a later attempt makes new ones)."""
        await self._clients.aclose()

    async def run_once(self) -> int:
        """Claim the due deliveries (at most `concurrency`), attempt them all; return how many."""
        claims = await self._claim(self._concurrency)
        async with asyncio.TaskGroup() as group:
            for claim in claims:
                group.create_task(self._process(claim))
        return len(claims)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then finish the attempts in hand and return.

        New deliveries are claimed as soon as a slot frees up, and a retry this process
        scheduled wakes it at its time. Otherwise it polls, for deliveries made or freed
        elsewhere (a resend through the API, a lease run out): every `idle_poll` seconds.
        """
        idle_poll = min(IDLE_POLL_SECONDS, IDLE_POLL_FACTOR * self._settings.poll_interval_seconds)
        stopping = asyncio.create_task(stop.wait())
        woken = asyncio.create_task(self._wakeup.wait())
        in_flight = self._in_flight
        self._running = True
        try:
            while not stop.is_set():
                self._wakeup.clear()
                limit = self._free()
                try:
                    claims = await self._claim(limit)
                except Exception:
                    log.exception("claiming webhook deliveries failed")
                    claims = []
                for claim in claims:
                    self._start(self._process(claim))
                if woken.done():
                    woken = asyncio.create_task(self._wakeup.wait())
                # While more may be due than there were slots, a slot that frees up claims
                # again at once; otherwise a wake-up does, or the poll.
                more_due = self._more_due = len(claims) >= limit
                await asyncio.wait(
                    {stopping, woken, *in_flight} if more_due else {stopping, woken},
                    timeout=self._settings.poll_interval_seconds if more_due else idle_poll,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        except asyncio.CancelledError:
            for task in in_flight:
                task.cancel()
            raise
        finally:
            self._running = False
            self._more_due = False
            stopping.cancel()
            woken.cancel()
            await asyncio.gather(stopping, woken, *in_flight, return_exceptions=True)
            await self.aclose()

    def reserve(self, wanted: int) -> int:
        """Take up to `wanted` free slots for deliveries to be handed over (`hand`); none
        unless `run` is running (it waits for what it was handed before it returns)."""
        granted = max(0, min(wanted, self._free())) if self._running else 0
        self._reserved += granted
        return granted

    def unreserve(self, count: int) -> None:
        """Give back slots that `reserve` took and no `hand` used."""
        self._reserved -= count

    def lease_until(self, now: datetime) -> datetime:
        # The lease outlives the attempt's deadline by a margin, so it never runs out
        # while the attempt is still in hand.
        lease = self._settings.webhook_timeout_seconds + self._settings.lease_seconds
        return now + timedelta(seconds=lease)

    def hand(self, attempts: Sequence[tuple[repository.Claim, Prepared]], *, reserved: int) -> None:
        """Make attempts that the caller leased and prepared in its own transaction (now
        committed), in the slots it reserved: no claim, no second read of the rows."""
        self._reserved -= reserved
        for claim, message in attempts:
            self._start(self._attempt(claim, message))

    def _free(self) -> int:
        # An attempt whose request has ended is only waiting for its record. (`run_once`'s
        # attempts are not in `_in_flight`: hence the floor.)
        sending = max(0, len(self._in_flight) - min(self._settling, self._concurrency))
        return self._concurrency - sending - self._reserved

    def _start(self, attempt: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(attempt)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _claim(self, limit: int) -> list[repository.Claim]:
        if limit <= 0:
            return []
        now = utcnow()
        async with unit_of_work(self._sessionmaker, alone=True) as session:
            return await repository.claim_due(
                session, limit=limit, now=now, lease_until=self.lease_until(now), alone=True
            )

    async def _process(self, claim: repository.Claim) -> None:
        try:
            message = await self._prepare(claim)
        except Exception:
            # The lease runs out and a later claim tries again; the loop must go on.
            log.exception("webhook attempt failed unexpectedly", delivery_id=claim.id)
            return
        if message is not None:
            await self._attempt(claim, message)

    async def _attempt(self, claim: repository.Claim, message: Prepared) -> None:
        try:
            attempted_at = utcnow()
            if message.unsendable is not None:
                await self._settle(claim, message, message.unsendable, attempted_at)
                return
            headers = {
                "content-type": "application/json",
                **sign_headers(claim.id, attempted_at, message.body, message.secrets),
            }
            result = await sender.post(
                self._clients.for_url(message.url),
                message.url,
                settings=self._settings,
                headers=headers,
                body=message.body,
                https_only=self._https_only,
                resolver=self._resolver,
            )
            await self._settle(claim, message, result, attempted_at)
        except Exception:
            # The lease runs out and a later claim tries again; the loop must go on.
            log.exception("webhook attempt failed unexpectedly", delivery_id=claim.id)

    async def _prepare(self, claim: repository.Claim) -> Prepared | None:
        async with self._sessionmaker() as session:
            delivery = await session.get(WebhookDelivery, claim.id)
            if delivery is None or (delivery.status, delivery.attempts) != (PENDING, claim.attempt):
                return None
            return await self.prepare(session, delivery)

    async def prepare(
        self, session: AsyncSession, delivery: WebhookDelivery, *, account: Account | None = None
    ) -> Prepared:
        """What an attempt of `delivery` sends (or why it cannot), read in `session`;
        `account`: the delivery's account, if the caller has read it already."""
        now = utcnow()
        if delivery.endpoint_id is None:
            if account is None or account.id != delivery.account_id:
                account = await session.get(Account, delivery.account_id)
            message = Prepared(None, url=delivery.url)
            if account is not None:
                message.secrets = [account.webhook_secret]
        else:
            endpoint = await session.get(WebhookEndpoint, delivery.endpoint_id)
            message = Prepared(delivery.endpoint_id)
            if endpoint is None:
                return _unsendable(message, "the endpoint was deleted", final=True)
            if endpoint.disabled_at is not None:
                reason = f"the endpoint is disabled: {endpoint.disabled_reason or 'no reason'}"
                return _unsendable(message, reason, final=True)
            # Deliveries follow the endpoint's current URL, as edited since enqueueing.
            message.url = endpoint.url
            message.secrets = _endpoint_secrets(endpoint, now)
        if not message.secrets:
            return _unsendable(message, "the account has no webhook secret", final=True)
        try:
            payload = await self._payload_builder(session, delivery)
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        except Exception:
            # The attempt log is shown to the customer: the details go to our log only.
            log.exception("building a webhook payload failed", delivery_id=delivery.id)
            reason = "building the payload failed (an internal error); it will be retried"
            return _unsendable(message, reason, final=False)
        if len(body) >= MAX_PAYLOAD_BYTES:
            reason = f"the payload is {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
            return _unsendable(message, reason, final=True)
        message.body = body
        return message

    async def _settle(
        self,
        claim: repository.Claim,
        message: Prepared,
        result: sender.AttemptResult,
        attempted_at: datetime,
    ) -> None:
        ended = _Ended(claim, message, result, attempted_at)
        self._settling += 1
        if self._more_due:
            self.wake()  # its slot is free: claim more now, not when its record is made
        try:
            planned, outcome, retry_at = await self._settlements.run_batched(self._record, ended)
        finally:
            self._settling -= 1
        if outcome == SUPERSEDED:
            log.info("webhook attempt outlived its claim", delivery_id=claim.id)
        if retry_at is not None:
            # Claim it at its time rather than at the next idle poll.
            delay = (retry_at - utcnow()).total_seconds() + RETRY_WAKE_MARGIN_SECONDS
            asyncio.get_running_loop().call_later(max(0.0, delay), self.wake)
        metrics.record(result, status=outcome, sent=message.unsendable is None)
        log.info(
            "webhook attempt",
            delivery_id=claim.id,
            attempt=claim.attempt,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            outcome=planned,
        )

    async def _record(self, session: AsyncSession, attempts: Sequence[_Ended]) -> list[Settled]:
        """The attempts' rows and their deliveries' new states, for all of them at once:
        the attempts' rows and the deliveries to a job's own URL that succeeded (most of
        them), in one statement on PostgreSQL; the others one by one (they may change
        their endpoint too). When that statement is all of it, it may commit by itself."""
        now = utcnow()
        simple = [ended.claim for ended in attempts if _delivered_to_url(ended)]
        delivered = await repository.settle_delivered(
            session,
            simple,
            now,
            before=[(_ADD_ATTEMPT, [_attempt_row(ended) for ended in attempts])],
            alone=len(simple) == len(attempts),
        )
        settled: list[Settled] = []
        for ended in attempts:
            if _delivered_to_url(ended):
                outcome = DELIVERED if ended.claim.id in delivered else SUPERSEDED
                settled.append((DELIVERED, outcome, None))
            else:
                settled.append(await self._record_one(session, ended, now))
        return settled

    async def _record_one(self, session: AsyncSession, ended: _Ended, now: datetime) -> Settled:
        claim, message = ended.claim, ended.message
        endpoint = None
        if message.endpoint_id is not None:
            endpoint = await session.get(WebhookEndpoint, message.endpoint_id)
        values, endpoint_values = self._outcome(claim, message, ended.result, endpoint, now)
        if not await repository.settle(session, claim, **values):
            # Another claim owns the delivery now: keep the attempt row, change nothing else.
            return values["status"], SUPERSEDED, None
        for name, value in endpoint_values.items():
            setattr(endpoint, name, value)
        return values["status"], values["status"], values["next_attempt_at"]

    def _outcome(
        self,
        claim: repository.Claim,
        message: Prepared,
        result: sender.AttemptResult,
        endpoint: WebhookEndpoint | None,
        now: datetime,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The delivery's new values, and the endpoint's (failing since, disabled)."""
        if result.ok:
            cleared = {"failing_since": None} if endpoint is not None else {}
            return {"status": DELIVERED, "delivered_at": now, "next_attempt_at": None}, cleared
        failed = {"status": FAILED, "next_attempt_at": None}
        if message.final:
            return failed, {}
        if result.status_code == 410:
            gone = repository.disabled(now, "answered 410 Gone") if endpoint is not None else {}
            return failed, gone
        endpoint_values: dict[str, Any] = {}
        if message.unsendable is None and endpoint is not None:
            failing_since = endpoint.failing_since or now
            endpoint_values["failing_since"] = failing_since
            if (now - failing_since).total_seconds() > self._settings.webhook_disable_after_seconds:
                reason = f"failing since {failing_since.isoformat()}"
                return failed, endpoint_values | repository.disabled(now, reason)
        delay = next_delay(
            claim.attempt,
            self._settings,
            status_code=result.status_code,
            timed_out=result.timed_out,
            retry_after=result.retry_after,
            now=now,
            rng=self._rng,
        )
        if delay is None:
            return failed, endpoint_values
        retry_at = now + timedelta(seconds=delay)
        return {"status": PENDING, "next_attempt_at": retry_at}, endpoint_values


@dataclass(frozen=True, slots=True)
class _Ended:
    """An attempt made, to record: its claim, what it sent, how it went and when."""

    claim: repository.Claim
    message: Prepared
    result: sender.AttemptResult
    attempted_at: datetime


def _attempt_row(ended: _Ended) -> dict[str, Any]:
    result = ended.result
    return {
        "delivery_id": ended.claim.id,
        "attempted_at": ended.attempted_at,
        "status_code": result.status_code,
        "latency_ms": result.latency_ms,
        "response_body": result.response_body,
        "error": result.error,
    }


def _delivered_to_url(ended: _Ended) -> bool:
    # A success with no endpoint to update: `delivered`, the same for every such attempt.
    return ended.result.ok and ended.message.endpoint_id is None


def _endpoint_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The endpoint's secret, and during a rotation window its previous one too."""
    secrets = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and expires > now:
        secrets.append(endpoint.previous_secret)
    return secrets


def _unsendable(message: Prepared, reason: str, *, final: bool) -> Prepared:
    message.unsendable = sender.AttemptResult(error=reason[: sender.MAX_ERROR_CHARS])
    message.final = final
    return message
