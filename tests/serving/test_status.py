"""Upstream answers → the closed set of error codes, and the retry delay that honours them."""

from __future__ import annotations

import pytest

from aigen.serving.base import (
    ERRORS_BY_CODE,
    ProviderError,
    ProviderUnavailable,
    RateLimitedByProvider,
    error_for_code,
)
from aigen.serving.status import error_for_status
from aigen.workflow.handlers import MAX_RETRY_AFTER_SECONDS, retry_delay

CODES = {*ERRORS_BY_CODE, "provider_error"}


class TestErrorForStatus:
    @pytest.mark.parametrize(
        ("status", "code", "retryable"),
        [
            (400, "invalid_input", False),
            (401, "provider_misconfigured", False),
            (402, "provider_error", False),
            (403, "provider_misconfigured", False),
            (404, "provider_misconfigured", False),
            (408, "provider_timeout", True),
            (409, "provider_unavailable", True),
            (413, "invalid_input", False),
            (418, "provider_error", False),
            (422, "invalid_input", False),
            (429, "provider_rate_limited", True),
            (500, "provider_unavailable", True),
            (503, "provider_unavailable", True),
        ],
    )
    def test_codes(self, status: int, code: str, retryable: bool) -> None:
        error = error_for_status(status, "nope")
        assert (error.code, error.retryable) == (code, retryable)
        assert str(status) in error.message

    def test_content_policy_wins(self) -> None:
        error = error_for_status(400, "no", upstream_code="content_policy_violation")
        assert error.code == "content_rejected"


class TestErrorForCode:
    def test_known(self) -> None:
        assert isinstance(error_for_code("provider_unavailable", "down"), ProviderUnavailable)

    def test_unknown_stays_in_the_closed_set(self) -> None:
        error = error_for_code("n8n_node_exploded", "it broke")
        assert type(error) is ProviderError
        assert error.code == "provider_error"
        assert error.code in CODES
        assert not error.retryable
        assert "n8n_node_exploded" in error.message


class TestRetryDelay:
    def test_backoff_doubles_with_jitter(self) -> None:
        error = ProviderUnavailable("down")
        for number, base in [(1, 1.0), (2, 2.0), (3, 4.0)]:
            assert 0.8 * base <= retry_delay(1.0, number, error) <= 1.2 * base

    def test_retry_after_is_never_cut_by_jitter(self) -> None:
        error = RateLimitedByProvider("slow down", retry_after=5.0)
        delays = [retry_delay(0.01, 1, error) for _ in range(200)]
        assert min(delays) >= 5.0
        assert max(delays) <= 6.0

    def test_backoff_longer_than_retry_after_wins(self) -> None:
        error = RateLimitedByProvider("slow down", retry_after=0.1)
        assert retry_delay(10.0, 1, error) >= 8.0

    def test_too_long_a_retry_after_gets_the_backoff(self) -> None:
        error = RateLimitedByProvider("slow down", retry_after=MAX_RETRY_AFTER_SECONDS + 1)
        assert retry_delay(1.0, 1, error) <= 1.2
