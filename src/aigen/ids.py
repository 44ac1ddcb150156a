"""Prefixed, time-sortable identifiers (`job_…`, `acc_…`): newest-first lists page by id.
Event ids are time-ordered too (UUID version 7), for the tables keyed by them."""

from __future__ import annotations

import secrets
import time
from datetime import datetime


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 16 random hex digits; sorts by creation."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def new_event_id() -> str:
    """A UUID version 7 (RFC 9562) as 32 lowercase hex digits: 48 bits of Unix
    milliseconds, the version, 74 random bits and the variant.

    Every consumer's inbox row is keyed by its event's id, and every outbox row has it in
    a unique index. Ordered by time, new rows go in at the end of those indexes, not at
    random places through all of them, and a consumer's old rows lie in one range of its
    key, which the retention sweep deletes by that range (`bus.inbox.purge`). (Python 3.14 has
    `uuid.uuid7`; this is the same layout, written out for 3.11.)
    """
    random = int.from_bytes(secrets.token_bytes(10))  # 80 bits, 74 of them used
    rand_a = random >> 68  # 12 bits
    rand_b = random & ((1 << 62) - 1)  # 62 bits
    value = (int(time.time() * 1000) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return f"{value:032x}"


def event_id_floor(at: datetime) -> str:
    """The least event id `new_event_id` can make at `at` or later: every id made
    earlier sorts below it (as text, the same as by value: fixed-length lowercase hex)."""
    return f"{int(at.timestamp() * 1000):012x}{'0' * 20}"
