"""Prefixed, time-sortable identifiers (`job_…`, `acc_…`): newest-first lists page by id."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 16 random hex digits; sorts by creation."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"
