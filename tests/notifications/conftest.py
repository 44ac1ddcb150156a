"""Fixtures for the notification tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .receiver import WebhookReceiverDouble


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiverDouble]:
    """A loopback webhook receiver that answers 200 unless told otherwise."""
    async with WebhookReceiverDouble() as double:
        yield double
