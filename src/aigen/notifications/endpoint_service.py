"""Webhook endpoints: an account's URLs, each with its event filter and signing secret.

A URL is checked by the SSRF guard when it is set (and again at every attempt, since DNS
may change). The check comes before the first database read: on SQLite a transaction
holds the write lock from its first statement, and DNS may take seconds.

Rotation keeps the previous secret signing beside the new one for `ROTATION_OVERLAP`, so
receivers can switch at leisure; rotating again within that time retires the older one.
Disabling stops deliveries: pending messages fail at their next attempt and can be sent
again (`delivery_log.recover`) once the endpoint is enabled. Nothing here commits.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.errors import Conflict, NotFound, Unprocessable
from aigen.ids import new_id
from aigen.models import WebhookDelivery, WebhookEndpoint

from . import repository
from .schemas import Endpoint, EndpointCreate, EndpointUpdate, EndpointWithSecret
from .service import PENDING
from .signing import new_secret
from .ssrf import Resolver, UnsafeURLError, validate_url

MAX_ENDPOINTS = 50
ROTATION_OVERLAP = timedelta(hours=24)
DISABLED_BY_ACCOUNT = "disabled through the API"


class WebhookEndpointNotFound(NotFound):
    code = "webhook_endpoint_not_found"
    title = "Webhook endpoint not found"


class UnsafeWebhookURLError(Unprocessable):
    code = "unsafe_webhook_url"
    title = "The webhook URL may not be called"


class TooManyEndpointsError(Conflict):
    code = "too_many_webhook_endpoints"
    title = "The account has the most webhook endpoints allowed"


async def check_url(url: str, settings: Settings, *, resolver: Resolver | None = None) -> str:
    """`url` stripped, or `UnsafeWebhookURLError` saying why the SSRF guard refuses it."""
    url = url.strip()
    try:
        await validate_url(url, settings, https_only=settings.webhook_https_only, resolver=resolver)
    except UnsafeURLError as exc:
        raise UnsafeWebhookURLError(str(exc)) from None
    return url


async def create(
    session: AsyncSession,
    account_id: str,
    new: EndpointCreate,
    *,
    settings: Settings,
    resolver: Resolver | None = None,
) -> WebhookEndpoint:
    """A new enabled endpoint with a fresh `whsec_` secret."""
    url = await check_url(new.url, settings, resolver=resolver)
    count = await session.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.account_id == account_id)
    )
    if (count or 0) >= MAX_ENDPOINTS:
        raise TooManyEndpointsError(f"an account may have at most {MAX_ENDPOINTS} endpoints")
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_id("ep"),
        account_id=account_id,
        url=url,
        events=new.events,
        description=new.description,
        secret=new_secret(),
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    await session.flush()
    return endpoint


async def get(
    session: AsyncSession, endpoint_id: str, *, account_id: str, for_update: bool = False
) -> WebhookEndpoint:
    """The endpoint, or 404; another account's endpoint is 404 too, never 403."""
    endpoint = await session.get(WebhookEndpoint, endpoint_id, with_for_update=for_update)
    if endpoint is None or endpoint.account_id != account_id:
        raise WebhookEndpointNotFound(f"no webhook endpoint {endpoint_id}")
    return endpoint


async def list_for(
    session: AsyncSession, account_id: str, *, before: str | None = None, limit: int = 20
) -> list[WebhookEndpoint]:
    """Newest first; `before` is the last id of the previous page (ids sort by time)."""
    statement = select(WebhookEndpoint).where(WebhookEndpoint.account_id == account_id)
    if before:
        statement = statement.where(WebhookEndpoint.id < before)
    statement = statement.order_by(WebhookEndpoint.id.desc()).limit(limit)
    return list((await session.scalars(statement)).all())


async def update(
    session: AsyncSession,
    endpoint_id: str,
    changes: EndpointUpdate,
    *,
    account_id: str,
    settings: Settings,
    resolver: Resolver | None = None,
) -> WebhookEndpoint:
    """Change the fields given; pending messages go to the new URL from their next attempt."""
    values = changes.model_dump(exclude_unset=True)
    if "url" in values:
        values["url"] = await check_url(values["url"], settings, resolver=resolver)
    endpoint = await get(session, endpoint_id, account_id=account_id, for_update=True)
    for name, value in values.items():
        setattr(endpoint, name, value)
    endpoint.updated_at = utcnow()
    if "url" in values:
        # The log shows pending messages going where their next attempt will go.
        await session.execute(
            sql_update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == PENDING)
            .values(url=endpoint.url)
            .execution_options(synchronize_session=False)
        )
    await session.flush()
    return endpoint


async def delete(session: AsyncSession, endpoint_id: str, *, account_id: str) -> None:
    """Remove the endpoint; its pending messages fail at their next attempt, logged."""
    endpoint = await get(session, endpoint_id, account_id=account_id, for_update=True)
    await session.delete(endpoint)
    await session.flush()


async def set_enabled(
    session: AsyncSession, endpoint_id: str, *, account_id: str, enabled: bool
) -> WebhookEndpoint:
    """Enable (forgetting past failures) or disable the endpoint; idempotent."""
    endpoint = await get(session, endpoint_id, account_id=account_id, for_update=True)
    now = utcnow()
    if enabled and endpoint.disabled_at is not None:
        endpoint.disabled_at = None
        endpoint.disabled_reason = None
        endpoint.failing_since = None
        endpoint.updated_at = now
    elif not enabled and endpoint.disabled_at is None:
        for name, value in repository.disabled(now, DISABLED_BY_ACCOUNT).items():
            setattr(endpoint, name, value)
    await session.flush()
    return endpoint


async def rotate_secret(
    session: AsyncSession, endpoint_id: str, *, account_id: str
) -> WebhookEndpoint:
    """A new secret; the one it replaces keeps signing beside it for `ROTATION_OVERLAP`."""
    endpoint = await get(session, endpoint_id, account_id=account_id, for_update=True)
    now = utcnow()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + ROTATION_OVERLAP
    endpoint.secret = new_secret()
    endpoint.updated_at = now
    await session.flush()
    return endpoint


def render(endpoint: WebhookEndpoint) -> Endpoint:
    """The endpoint as the API shows it, without its secret."""
    expires = endpoint.previous_secret_expires_at
    return Endpoint(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events or None,
        description=endpoint.description,
        enabled=endpoint.disabled_at is None,
        disabled_at=endpoint.disabled_at,
        disabled_reason=endpoint.disabled_reason,
        failing_since=endpoint.failing_since,
        previous_secret_expires_at=expires if expires is not None and expires > utcnow() else None,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
    )


def render_with_secret(endpoint: WebhookEndpoint) -> EndpointWithSecret:
    """The endpoint and its current secret (creation and rotation answers only)."""
    return EndpointWithSecret(**render(endpoint).model_dump(), secret=endpoint.secret)
