"""The examples under `deploy/` say what the code reads: no setting misspelled, no server
needed. (PyYAML comes with `moto[server]`, a test dependency.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from aigen.config import Settings
from aigen.storage import S3Store, create_store

DEPLOY = Path(__file__).parents[2] / "deploy"
# Read by the libraries rather than by `Settings`.
FOREIGN = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"}


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "aigen.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_every_setting_of_the_env_example_exists() -> None:
    fields = {f"AIGEN_{name.upper()}" for name in Settings.model_fields}
    assert set(env_example()) - fields - FOREIGN == set()


def test_the_env_example_needs_only_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env_example().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="AIGEN_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("AIGEN_SECRET_KEY", "s" * 48)
    settings = Settings()
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.broker_url.startswith("amqp://")
    assert isinstance(create_store(settings), S3Store)


def test_nginx_limits_the_body_and_passes_a_request_id() -> None:
    conf = (DEPLOY / "nginx" / "aigen.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)k;", conf)
    assert limit is not None
    assert int(limit.group(1)) * 1024 == Settings.model_fields["max_body_bytes"].default
    assert "proxy_set_header X-Request-Id" in conf
    upstream = re.search(r"upstream aigen_api \{(.*?)\}", conf, re.S)
    assert upstream is not None
    assert upstream.group(1).count("server ") >= 2


def test_k8s_runs_every_part() -> None:
    commands = {}
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] in ("Deployment", "Job"):
                container = document["spec"]["template"]["spec"]["containers"][0]
                commands[container["args"][1]] = container
    assert set(commands) == {"api", "worker", "backend", "notifier", "relay", "migrate"}
    assert commands["api"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
