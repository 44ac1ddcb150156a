"""The `result` label of `aigen_webhook_attempts_total`: what the receiver answered, or why not."""

from __future__ import annotations

import pytest

from aigen.notifications.metrics import result_class
from aigen.notifications.sender import AttemptResult


@pytest.mark.parametrize(
    ("result", "sent", "label"),
    [
        (AttemptResult(status_code=204), True, "2xx"),
        (AttemptResult(status_code=301, error="redirects are not followed"), True, "3xx"),
        (AttemptResult(status_code=429), True, "4xx"),
        (AttemptResult(status_code=503), True, "5xx"),
        (AttemptResult(error="timed out after 15 s", timed_out=True), True, "timeout"),
        (AttemptResult(error="refused by the SSRF guard: loopback"), True, "refused"),
        (AttemptResult(error="ConnectError: refused"), True, "network"),
        (AttemptResult(error="the endpoint was deleted"), False, "unsendable"),
    ],
)
def test_result_class(result: AttemptResult, sent: bool, label: str) -> None:
    assert result_class(result, sent=sent) == label
