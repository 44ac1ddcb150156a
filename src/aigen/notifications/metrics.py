"""Prometheus metrics of webhook delivery (DESIGN §10).

They count in the process that runs the notifier; `/metrics` serves them where that
process also serves the API (`aigen up`).

`aigen_webhook_attempts_total{outcome, result}`: `outcome` is what the attempt did to its
delivery (`delivered`, `retrying`, `failed`, or `superseded` when the delivery was
claimed again or redelivered meanwhile); `result` is what the receiver answered
(`2xx` … `5xx`) or why there was no answer (`timeout`, `network`, `refused` by the SSRF
guard, `unsendable` when no request could be made).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from .sender import AttemptResult

WEBHOOK_ATTEMPTS = Counter(
    "aigen_webhook_attempts",
    "Webhook delivery attempts, by what they did to the delivery and what was answered.",
    ["outcome", "result"],
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "aigen_webhook_attempt_seconds",
    "Time from connecting to the receiver to its answer (or the failure).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
OUTCOMES = {"delivered": "delivered", "pending": "retrying", "failed": "failed"}


def result_class(result: AttemptResult, *, sent: bool) -> str:
    """The `result` label of an attempt; `sent` is False when no request was made."""
    if not sent:
        return "unsendable"
    if result.status_code is not None:
        return f"{result.status_code // 100}xx"
    if result.timed_out:
        return "timeout"
    if result.error and result.error.startswith("refused by the SSRF guard"):
        return "refused"
    return "network"


def record(result: AttemptResult, *, status: str, sent: bool) -> None:
    """Count one settled attempt; `status` is the delivery's status after it."""
    WEBHOOK_ATTEMPTS.labels(
        outcome=OUTCOMES.get(status, status), result=result_class(result, sent=sent)
    ).inc()
    if sent:
        WEBHOOK_ATTEMPT_SECONDS.observe(result.latency_ms / 1000)
