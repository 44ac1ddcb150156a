"""`/v1/webhooks`: create, list, get, update, delete, enable and disable, rotate the secret."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from aigen.clock import utcnow
from aigen.gateway.app import create_app
from aigen.notifications.endpoint_service import MAX_ENDPOINTS
from aigen.notifications.service import JOB_COMPLETED, JOB_FAILED
from tests.fixtures.platform import Api
from tests.gateway.test_errors import assert_problem

from .api_helpers import create_endpoint

HOOK = "http://127.0.0.1:9/hook"  # loopback is allowed in tests; nothing is sent here


class TestCreate:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.post("/v1/webhooks", json={"url": HOOK}), 401)

    async def test_needs_the_webhooks_scope(self, api: Api) -> None:
        customer = await api.customer(scopes=["generate", "read"])
        async with api.client(customer) as client:
            answer = await client.post("/v1/webhooks", json={"url": HOOK})
        assert_problem(answer, 403, "insufficient_scope")

    async def test_secret_is_shown_once(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            created = await create_endpoint(
                client, HOOK, events=[JOB_FAILED, JOB_FAILED], description="orders"
            )
            assert created["id"].startswith("ep_")
            assert created["secret"].startswith("whsec_")
            assert created["events"] == [JOB_FAILED]
            assert (created["url"], created["description"]) == (HOOK, "orders")
            assert created["enabled"] is True
            again = (await client.get(f"/v1/webhooks/{created['id']}")).json()
            listed = (await client.get("/v1/webhooks")).json()["data"]
        assert "secret" not in again
        assert again == {k: v for k, v in created.items() if k != "secret"}
        assert [e["id"] for e in listed] == [created["id"]]
        assert "secret" not in listed[0]

    async def test_empty_events_means_every_event(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            assert (await create_endpoint(client, HOOK, events=[]))["events"] is None
            assert (await create_endpoint(client, HOOK))["events"] is None

    async def test_invalid_body(self, api: Api) -> None:
        bodies: list[dict[str, object]] = [
            {"url": HOOK, "events": ["job.completed"]},
            {"url": HOOK, "events": ["ai.generation.job.completed"]},
            {"url": HOOK, "colour": "red"},
            {"url": ""},
            {"url": HOOK, "description": "x" * 501},
            {},
        ]
        async with api.client(await api.customer()) as client:
            for body in bodies:
                answer = await client.post("/v1/webhooks", json=body)
                assert_problem(answer, 422, "validation_error")
            assert (await client.get("/v1/webhooks")).json()["data"] == []

    async def test_limit_per_account(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            for _ in range(MAX_ENDPOINTS):
                await create_endpoint(client, HOOK)
            answer = await client.post("/v1/webhooks", json={"url": HOOK})
        assert_problem(answer, 409, "too_many_webhook_endpoints")


# Refused with the allow-list off, as in production. A few of each kind; the guard's own
# table (tests/notifications/test_ssrf.py) has the rest.
REFUSED = [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://localhost/hook", "loopback"),  # a name that resolves to loopback
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.20/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://[::ffff:10.0.0.1]/", "private"),  # IPv4-mapped IPv6
    ("http://[::1]/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal 127.0.0.1
    ("http://0x7f.1/", "loopback"),  # hex and short form
    ("http://0.0.0.0/", "unspecified"),
    ("ftp://93.184.216.34/", "scheme"),
    ("http://user@/", "no host"),
]


class TestSSRF:
    async def test_refused_at_creation(self, strict_api: Api) -> None:
        async with strict_api.client(await strict_api.customer()) as client:
            for url, reason in REFUSED:
                answer = await client.post("/v1/webhooks", json={"url": url})
                body = assert_problem(answer, 422, "unsafe_webhook_url")
                assert reason in body["detail"], (url, body["detail"])
            assert (await client.get("/v1/webhooks")).json()["data"] == []

    async def test_refused_at_update(self, strict_api: Api) -> None:
        async with strict_api.client(await strict_api.customer()) as client:
            endpoint = await create_endpoint(client, "https://93.184.216.34/hook")
            path = f"/v1/webhooks/{endpoint['id']}"
            answer = await client.patch(path, json={"url": "http://169.254.169.254/"})
            body = assert_problem(answer, 422, "unsafe_webhook_url")
            assert "link-local (cloud metadata)" in body["detail"]
            assert (await client.get(path)).json()["url"] == "https://93.184.216.34/hook"

    async def test_https_only(self, strict_api: Api) -> None:
        settings = strict_api.deps.settings.model_copy(update={"webhook_https_only": True})
        deps = dataclasses.replace(strict_api.deps, settings=settings)
        https_only = Api(deps, create_app(settings, deps=deps))
        async with https_only.client(await https_only.customer()) as client:
            answer = await client.post("/v1/webhooks", json={"url": "http://93.184.216.34/"})
            assert "must be https" in assert_problem(answer, 422, "unsafe_webhook_url")["detail"]
            await create_endpoint(client, "https://93.184.216.34/")


class TestOtherAccounts:
    async def test_another_accounts_endpoint_is_404(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            endpoint_id = (await create_endpoint(client, HOOK))["id"]
        async with api.client(await api.customer()) as client:
            base = f"/v1/webhooks/{endpoint_id}"
            answers = [
                await client.get(base),
                await client.patch(base, json={"description": "mine now"}),
                await client.delete(base),
                await client.post(f"{base}/disable"),
                await client.post(f"{base}/enable"),
                await client.post(f"{base}/rotate-secret"),
                await client.get(f"{base}/deliveries"),
                await client.post(f"{base}/recover", json={"since": utcnow().isoformat()}),
            ]
            for answer in answers:
                assert_problem(answer, 404, "webhook_endpoint_not_found")
            assert (await client.get("/v1/webhooks")).json()["data"] == []


class TestList:
    async def test_newest_first_with_cursor(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            ids = [(await create_endpoint(client, HOOK))["id"] for _ in range(5)]
            first = (await client.get("/v1/webhooks", params={"limit": 3})).json()
            cursor = first["next_cursor"]
            second = (
                await client.get("/v1/webhooks", params={"limit": 3, "cursor": cursor})
            ).json()
        assert [e["id"] for e in first["data"]] == ids[::-1][:3]
        assert first["has_more"] is True
        assert [e["id"] for e in second["data"]] == ids[::-1][3:]
        assert (second["has_more"], second["next_cursor"]) == (False, None)


class TestUpdate:
    async def test_changes_only_the_fields_given(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            endpoint = await create_endpoint(client, HOOK, events=[JOB_FAILED], description="a")
            path = f"/v1/webhooks/{endpoint['id']}"
            changed = (await client.patch(path, json={"url": "http://127.0.0.1:10/new"})).json()
            assert (changed["url"], changed["events"], changed["description"]) == (
                "http://127.0.0.1:10/new",
                [JOB_FAILED],
                "a",
            )
            assert changed["updated_at"] > endpoint["updated_at"]
            changed = (await client.patch(path, json={"events": None, "description": None})).json()
            assert (changed["events"], changed["description"]) == (None, None)
            changed = (await client.patch(path, json={"events": [JOB_COMPLETED]})).json()
            assert changed["events"] == [JOB_COMPLETED]
            assert_problem(await client.patch(path, json={"url": None}), 422, "validation_error")
            assert_problem(await client.patch(path, json={"secret": "whsec_x"}), 422)


class TestDelete:
    async def test_gone_afterwards(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            path = f"/v1/webhooks/{(await create_endpoint(client, HOOK))['id']}"
            answer = await client.delete(path)
            assert (answer.status_code, answer.content) == (204, b"")
            assert_problem(await client.get(path), 404, "webhook_endpoint_not_found")
            assert_problem(await client.delete(path), 404)


class TestEnableDisable:
    async def test_round_trip(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            path = f"/v1/webhooks/{(await create_endpoint(client, HOOK))['id']}"
            disabled = (await client.post(f"{path}/disable")).json()
            assert disabled["enabled"] is False
            assert disabled["disabled_reason"] == "disabled through the API"
            assert (await client.post(f"{path}/disable")).json() == disabled  # idempotent
            enabled = (await client.post(f"{path}/enable")).json()
            assert enabled["enabled"] is True
            assert (enabled["disabled_at"], enabled["disabled_reason"]) == (None, None)


class TestRotateSecret:
    async def test_new_secret_and_the_old_one_for_24_hours(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            created = await create_endpoint(client, HOOK)
            path = f"/v1/webhooks/{created['id']}"
            rotated = (await client.post(f"{path}/rotate-secret")).json()
            shown = (await client.get(path)).json()
        assert rotated["secret"].startswith("whsec_")
        assert rotated["secret"] != created["secret"]
        assert created["previous_secret_expires_at"] is None
        expires = rotated["previous_secret_expires_at"]
        left = datetime.fromisoformat(expires) - utcnow()
        assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
        assert shown["previous_secret_expires_at"] == expires
        assert "secret" not in shown
