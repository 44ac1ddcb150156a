"""The delivery log through the API: jobs' own URLs, redelivery, recovery, secret rotation."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from aigen.client import WebhookVerificationError, verify_webhook
from aigen.clock import utcnow
from aigen.db.session import unit_of_work
from aigen.models import WebhookDelivery, WebhookEndpoint
from tests.fixtures.platform import Api
from tests.gateway.test_errors import assert_problem

from .api_helpers import completed_job, create_endpoint, dispatcher, notifier, settled_log
from .receiver import Answer, WebhookReceiverDouble


class TestList:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.get("/v1/webhook-deliveries"), 401)

    async def test_a_jobs_own_url_and_endpoints(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, receiver.url("/endpoint"))
            job_id = await completed_job(api, customer, webhook_url=receiver.url("/job"))
            await completed_job(api, customer)  # to the endpoint only
            async with notifier(api):
                log = await settled_log(client, f"/v1/webhook-deliveries?job_id={job_id}", count=2)
            everything = (await client.get("/v1/webhook-deliveries")).json()["data"]
            by_endpoint = (
                await client.get("/v1/webhook-deliveries", params={"endpoint_id": endpoint["id"]})
            ).json()["data"]
            failed = (await client.get("/v1/webhook-deliveries?status=failed")).json()["data"]
        assert {d["endpoint_id"] for d in log} == {None, endpoint["id"]}
        to_job = next(d for d in log if d["endpoint_id"] is None)
        assert (to_job["url"], to_job["job_id"], to_job["status"]) == (
            receiver.url("/job"),
            job_id,
            "delivered",
        )
        assert to_job["event_type"] == "ai_generation.job.completed"
        assert [a["status_code"] for a in to_job["attempts"]] == [200]
        assert len(everything) == 3
        assert len(by_endpoint) == 2
        assert failed == []

    async def test_pages_newest_first(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, "http://127.0.0.1:9/hook")
            for _ in range(3):
                await completed_job(api, customer)
            path = f"/v1/webhooks/{endpoint['id']}/deliveries"
            first = (await client.get(path, params={"limit": 2})).json()
            rest = (await client.get(path, params={"cursor": first["next_cursor"]})).json()
        ids = [d["id"] for d in first["data"] + rest["data"]]
        assert ids == sorted(ids, reverse=True)
        assert len(set(ids)) == 3
        assert (first["has_more"], rest["has_more"]) == (True, False)
        pending = first["data"][0]
        assert (pending["status"], pending["attempts"]) == ("pending", [])
        assert pending["next_attempt_at"] is not None

    async def test_another_accounts_messages_are_not_found(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        owner = await api.customer()
        job_id = await completed_job(api, owner, webhook_url=receiver.url())
        async with api.client(owner) as client:
            (delivery,) = (await client.get("/v1/webhook-deliveries")).json()["data"]
        async with api.client(await api.customer()) as client:
            path = f"/v1/webhook-deliveries/{delivery['id']}"
            assert_problem(await client.get(path), 404, "webhook_delivery_not_found")
            assert_problem(await client.post(f"{path}/redeliver"), 404)
            listed = await client.get("/v1/webhook-deliveries", params={"job_id": job_id})
            assert listed.json()["data"] == []


class TestRedeliver:
    async def test_same_webhook_id_again(self, api: Api, receiver: WebhookReceiverDouble) -> None:
        customer = await api.customer()
        job_id = await completed_job(api, customer, webhook_url=receiver.url())
        async with api.client(customer) as client:
            secret = (await client.get("/v1/webhooks/default/secret")).json()["key"]
            async with notifier(api):
                (delivery,) = await settled_log(client, "/v1/webhook-deliveries")
                answer = await client.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver")
                assert answer.status_code == 202
                assert answer.json()["status"] == "pending"
                await receiver.wait_for(2)
                (again,) = await settled_log(client, f"/v1/webhook-deliveries?job_id={job_id}")
        assert again["id"] == delivery["id"]
        assert [a["status_code"] for a in again["attempts"]] == [200, 200]
        assert [r.webhook_id for r in receiver.requests] == [delivery["id"]] * 2
        for request in receiver.requests:
            assert verify_webhook(request.body, request.headers, secret)["data"]["id"] == job_id

    async def test_disabled_endpoint_is_409(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, receiver.url())
            await completed_job(api, customer)
            (delivery,) = (await client.get("/v1/webhook-deliveries")).json()["data"]
            await client.post(f"/v1/webhooks/{endpoint['id']}/disable")
            answer = await client.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver")
        assert_problem(answer, 409, "webhook_endpoint_disabled")


class TestDeletedEndpoint:
    async def test_pending_messages_fail_and_stay_in_the_log(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, receiver.url())
            job_id = await completed_job(api, customer)
            assert (await client.delete(f"/v1/webhooks/{endpoint['id']}")).status_code == 204
            async with notifier(api):
                (delivery,) = await settled_log(client, f"/v1/webhook-deliveries?job_id={job_id}")
        assert (delivery["endpoint_id"], delivery["status"]) == (endpoint["id"], "failed")
        (attempt,) = delivery["attempts"]
        assert (attempt["status_code"], attempt["error"]) == (None, "the endpoint was deleted")
        assert receiver.requests == []


class TestRecover:
    async def test_failed_messages_since_a_time(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.default = Answer(500)
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, receiver.url())
            path = f"/v1/webhooks/{endpoint['id']}"
            for _ in range(3):
                await completed_job(api, customer)
            async with notifier(api):
                log = await settled_log(client, f"{path}/deliveries", count=3)
            oldest = log[-1]["id"]
            async with unit_of_work(api.deps.sessionmaker) as session:
                await session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == oldest)
                    .values(created_at=utcnow() - timedelta(days=2))
                )
            receiver.default = Answer(200)
            day_ago = (utcnow() - timedelta(days=1)).isoformat()
            recent = (await client.post(f"{path}/recover", json={"since": day_ago})).json()
            async with notifier(api):
                await receiver.wait_for(3 * 4 + 2)
                after = await settled_log(client, f"{path}/deliveries", count=3)
            older = await client.post(
                f"{path}/recover",
                json={"since": "2000-01-01T00:00:00", "until": day_ago},
            )
        assert {d["status"] for d in log} == {"failed"}
        assert recent["recovered"] == 2
        assert recent["endpoint_id"] == endpoint["id"]
        assert {d["id"]: d["status"] for d in after} == {
            log[0]["id"]: "delivered",
            log[1]["id"]: "delivered",
            oldest: "failed",
        }
        assert older.status_code == 202
        assert older.json()["recovered"] == 1
        assert older.json()["since"].startswith("2000-01-01T00:00:00")

    async def test_needs_times_in_order(self, api: Api) -> None:
        async with api.client(await api.customer()) as client:
            endpoint = await create_endpoint(client, "http://127.0.0.1:9/hook")
            path = f"/v1/webhooks/{endpoint['id']}/recover"
            now = utcnow().isoformat()
            assert_problem(await client.post(path, json={}), 422, "validation_error")
            answer = await client.post(path, json={"since": now, "until": now})
            assert "until must come after since" in assert_problem(answer, 422)["detail"]


class TestUpdatedURL:
    async def test_pending_messages_follow_the_endpoint(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, "http://127.0.0.1:9/old")
            await completed_job(api, customer)
            moved = {"url": receiver.url("/new")}
            await client.patch(f"/v1/webhooks/{endpoint['id']}", json=moved)
            async with notifier(api):
                (delivery,) = await settled_log(client, "/v1/webhook-deliveries")
        assert (delivery["url"], delivery["status"]) == (receiver.url("/new"), "delivered")
        (request,) = receiver.received("/new")
        request.verify(endpoint["secret"])


class TestRotation:
    async def test_every_attempt_verifies_before_and_after(
        self, api: Api, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/hook", Answer(500))
        customer = await api.customer()
        notifier_ = dispatcher(api)
        async with api.client(customer) as client:
            endpoint = await create_endpoint(client, receiver.url())
            old = endpoint["secret"]
            path = f"/v1/webhooks/{endpoint['id']}"
            await completed_job(api, customer)
            await notifier_.run_once()  # 500: a retry is due after the rotation
            new = (await client.post(f"{path}/rotate-secret")).json()["secret"]
            while len(receiver.requests) < 2:
                await notifier_.run_once()
                await asyncio.sleep(0.02)  # the retry is due 0.1 s after the first attempt
            await completed_job(api, customer)
            await notifier_.run_once()
            # The window has passed: the old secret signs no more.
            async with unit_of_work(api.deps.sessionmaker) as session:
                row = await session.get(WebhookEndpoint, endpoint["id"])
                assert row is not None
                row.previous_secret_expires_at = utcnow() - timedelta(seconds=1)
            assert (await client.get(path)).json()["previous_secret_expires_at"] is None
            await completed_job(api, customer)
            await notifier_.run_once()
        await notifier_.aclose()

        before, retry, during, after = receiver.requests
        assert retry.webhook_id == before.webhook_id
        assert len(before.headers["webhook-signature"].split()) == 1
        before.verify(old)
        with pytest.raises(Exception, match="No matching signature"):
            before.verify(new)
        for request in (retry, during):
            assert len(request.headers["webhook-signature"].split()) == 2
            assert request.verify(old) == request.verify(new)
            verify_webhook(request.body, request.headers, old)
            verify_webhook(request.body, request.headers, new)
        after.verify(new)
        with pytest.raises(WebhookVerificationError):
            verify_webhook(after.body, after.headers, old)
