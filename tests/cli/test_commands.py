"""The `aigen` command line as an operator uses it: real processes, JSON out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.scratch import free_port

MODELS = """
[[models]]
name = "echo"
provider = "scripted"
task = "text"
price_per_request = 2
[models.options]
output = "hello from the scripted model"
"""


def aigen(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "aigen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    return {
        **os.environ,
        "AIGEN_DATA_DIR": str(tmp_path / "data"),
        "AIGEN_MODELS_FILE": str(models),
        "AIGEN_LOCAL_MODELS": "false",
        "AIGEN_POLL_INTERVAL_SECONDS": "0.02",
    }


class TestAdmin:
    def test_account_key_credits_jobs(self, env: dict[str, str]) -> None:
        account = aigen(env, "accounts", "create", "acme", "--credits", "50", "--json")
        assert account["balance"] == 50
        assert account["webhook_secret"].startswith("whsec_")
        key = aigen(env, "keys", "create", "--account", account["id"], "--rpm", "5", "--json")
        assert key["key"].startswith("aig_live_")
        assert len(key["key"]) == len("aig_live_") + 32
        listed = aigen(env, "keys", "list", "--account", account["id"], "--json")
        assert [k["id"] for k in listed] == [key["id"]]
        assert key["key"] not in json.dumps(listed)
        granted = aigen(env, "credits", "grant", account["id"], "25", "--json")
        assert granted["balance"] == 75
        revoked = aigen(env, "keys", "revoke", key["id"], "--json")
        assert revoked["revoked_at"]
        assert aigen(env, "jobs", "list", "--json") == []

    def test_unknown_account_fails_clearly(self, env: dict[str, str]) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "aigen", "keys", "create", "--account", "acc_nope"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 1
        assert "acc_nope" in done.stderr


class TestUp:
    def test_up_runs_a_job_and_stops_on_sigterm(self, env: dict[str, str]) -> None:
        account = aigen(env, "accounts", "create", "acme", "--credits", "10", "--json")
        key = aigen(env, "keys", "create", "--account", account["id"], "--json")["key"]
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "aigen", "up", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            headers = {"Authorization": f"Bearer {key}"}
            job = httpx.post(
                f"{base}/v1/generate",
                json={"model": "echo", "input": {"prompt": "hi"}},
                headers=headers,
            ).json()
            while job["status"] not in ("completed", "failed"):
                time.sleep(0.1)
                job = httpx.get(f"{base}/v1/generate/{job['id']}", headers=headers).json()
            assert job["status"] == "completed"
            assert job["credits_charged"] == 2
            asset = httpx.get(job["assets"][0]["url"])
            assert asset.text == "hello from the scripted model"
            assert httpx.get(f"{base}/v1/models").json()["data"][0]["name"] == "echo"
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
