"""Notification Service (DESIGN §7): signed webhook deliveries, retries and the delivery log.

- `service`: `enqueue` one delivery per target of a job event; `redeliver`.
- `dispatcher`: `Dispatcher` claims due deliveries and makes their HTTP attempts.
- `ssrf`: `validate_url` and `pinned_request`, the guard every attempt passes.
- `signing`: Standard Webhooks headers and `whsec_` secrets; `schedule`: retry delays.
"""
