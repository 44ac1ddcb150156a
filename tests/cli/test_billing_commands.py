"""The billing side of the command line: key quotas, `accounts show`, `usage` (DESIGN §11).

In process (Typer's runner) against the test's database, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from aigen.cli.main import app
from aigen.config import Settings


@pytest.fixture
def aigen(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {
        "AIGEN_ENVIRONMENT": "test",
        "AIGEN_DATA_DIR": str(settings.data_dir),
        "AIGEN_DATABASE_URL": settings.database_url,
        "AIGEN_SECRET_KEY": settings.secret_key,
        "AIGEN_LOCAL_MODELS": "false",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AIGEN_REDIS_URL", raising=False)
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if "--json" in args else result.stdout

    return run


def test_quotas_show_and_usage(aigen: Any) -> None:
    account = aigen("accounts", "create", "acme", "--credits", "50", "--json")
    key = aigen(
        "keys", "create", "--account", account["id"], "--name", "ci",
        "--jobs-per-day", "10", "--credits-per-month", "500", "--json",
    )  # fmt: skip
    [listed] = aigen("keys", "list", "--account", account["id"], "--json")
    assert listed["id"] == key["id"]
    assert listed["name"] == "ci"
    assert listed["jobs_per_day"] == 10
    assert listed["credits_per_month"] == 500
    assert listed["last4"] == key["key"][-4:]
    assert listed["prefix"] == key["prefix"]
    assert listed["last_used_at"] is None
    table = aigen("keys", "list", "--account", account["id"])
    assert "LAST_USED_AT" in table
    assert key["prefix"] in table

    shown = aigen("accounts", "show", account["id"], "--json")
    assert shown["balance"] == shown["ledger_sum"] == 50
    [shown_key] = shown["keys"]
    assert shown_key["jobs_today"] == 0
    assert shown_key["credits_this_month"] == 0
    assert "JOBS_PER_DAY" in aigen("accounts", "show", account["id"])

    usage = aigen("usage", "--account", account["id"], "--json")
    assert usage["totals"] == {"jobs": 0, "credits_charged": 0}
    assert [e["kind"] for e in usage["entries"]] == ["grant"]
    assert usage["entries"][0]["amount"] == 50
    assert "grant" in aigen("usage", "--account", account["id"])
    past = aigen(
        "usage", "--account", account["id"], "--from", "2020-01-01", "--to", "2020-02-01", "--json"
    )
    assert past["entries"] == []


def test_usage_of_unknown_account_fails(aigen: Any) -> None:
    result = CliRunner().invoke(app, ["usage", "--account", "acc_nope"])
    assert result.exit_code == 1
    assert "no account acc_nope" in result.output
