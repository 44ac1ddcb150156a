"""`aigen up` with production URLs: every part in one process, on PostgreSQL, RabbitMQ,
Redis and S3, from a database it migrates itself."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.fixtures.stack import Stack

from .deployment import MARKS, open_production
from .queues import wait_drained

pytestmark = MARKS

BODY = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}


async def test_up_runs_every_part_on_the_production_servers(
    s3_endpoint: str, tmp_path: Path
) -> None:
    async with open_production(s3_endpoint, tmp_path, migrate=False) as production:
        stack = Stack(production.env, tmp_path)
        try:
            up = await stack.start("up")
            assert up.url is not None
            who = await production.customer(credits=100)
            async with httpx.AsyncClient(base_url=up.url, headers=who.headers) as client:
                ready = await client.get("/readyz")
                assert ready.json()["checks"] == dict.fromkeys(
                    ["database", "broker", "storage", "redis"], "ok"
                )
                answer = await client.post("/v1/generate", json=BODY, headers={"Prefer": "wait=30"})
                assert answer.status_code == 200, answer.text
                job = answer.json()
                assert job["status"] == "completed"
                asset = await client.get(job["assets"][0]["url"])
                # A presigned S3 URL, not one the API serves from a folder.
                assert job["assets"][0]["url"].startswith(production.s3_endpoint)
                assert asset.text == "four score and seven"
            await wait_drained(production.namespace)
            assert await stack.terminate(up) == 0, up.log_text()[-3000:]
        except BaseException:
            print(stack.tails())
            raise
        finally:
            await stack.aclose()
