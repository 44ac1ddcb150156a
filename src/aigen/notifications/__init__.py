"""Notification Service (DESIGN §7): signed webhook deliveries, retries and the delivery log.

- `service`: `enqueue` one delivery per target of a job event; `redeliver`.
- `dispatcher`: `Dispatcher` claims due deliveries and makes their HTTP attempts.
- `ssrf`: `validate_url` and `pinned_request`, the guard every attempt passes.
- `signing`: Standard Webhooks headers and `whsec_` secrets; `schedule`: retry delays.
- `endpoint_service`: the account's endpoints (URL, event filter, secret and rotation).
- `delivery_log`: messages with their attempts, redelivery, recovery since a time.
- `event_feed`: the account's job results from the outbox, for `GET /v1/events`.
- `schemas`: what the webhooks API takes and answers; `metrics`: Prometheus counters.
"""
