"""Billing statistics and usage aggregations on the known data set (chdb), and `tally stats`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from pipeline.stats import billing_stats, usage_aggregations
from sinks.clickhouse import ClickHouseSink, connect, migrate
from tests.integration.analytics_dataset import DAY, load


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[tuple[Client, str]]:
    url = f"chdb://{tmp_path / 'ch'}"
    client = connect(url)
    migrate(client)
    load(ClickHouseSink(client))
    yield client, url
    client.close()


def test_billing_stats_count_status_revenue_and_active_accounts(loaded: tuple[Client, str]) -> None:
    client, _ = loaded
    stats = billing_stats(client, DAY, DAY)
    assert stats.records_by_status == {"completed": 5, "adjusted": 1, "failed": 3}
    assert stats.failed_by_reason == {"malformed_json": 1, "too_late": 2}
    assert {k: v.base_units for k, v in stats.revenue_by_service.items()} == {
        "api_gateway": 50_000_000,
        "gpu_rental": 1_200_000,
        "model_inference": 300,
        "storage": 10_000,
    }
    assert {k: v.base_units for k, v in stats.revenue_by_method.items()} == {
        "subscription_fee": 50_000_000,
        "subscription_included": 0,
        "wallet_deduction": 1_210_300,
    }
    assert stats.total_revenue.base_units == 51_210_300
    assert stats.total_revenue.amount == Decimal("51.2103")
    assert stats.charges_by_service_and_method["api_gateway"] == {
        "subscription_fee": 1,
        "subscription_included": 1,
    }
    assert (stats.active_accounts, stats.active_providers) == (2, 1)
    # Outside the period: nothing.
    empty = billing_stats(client, DAY + timedelta(days=1), DAY + timedelta(days=2))
    assert empty.total_records == 0 and empty.total_revenue.base_units == 0 and empty.active_accounts == 0


def test_usage_aggregations_by_account_and_service(loaded: tuple[Client, str]) -> None:
    client, _ = loaded
    rows = {(r.account, r.service): r for r in usage_aggregations(client, DAY, DAY)}
    gpu = rows[("acct-a", "gpu_rental")]
    assert (gpu.events, gpu.gpu_hours, gpu.charges, gpu.charged.base_units) == (
        3,
        Decimal("0.05"),
        2,
        1_200_000,
    )
    chat = rows[("acct-a", "model_inference")]
    assert (chat.events, chat.requests, chat.tokens, chat.charged.base_units) == (2, 2, 300, 300)
    storage = rows[("acct-b", "storage")]
    assert storage.gb_months == Decimal(36_000) / (730 * 3600)
    assert rows[("acct-b", "api_gateway")].requests == 4
    assert rows[("acct-b", "api_gateway")].charged.base_units == 50_000_000
    only = usage_aggregations(client, DAY, DAY, account="acct-a", service="gpu_rental")
    assert [(r.account, r.service) for r in only] == [("acct-a", "gpu_rental")]


def test_tally_stats_prints_json_and_tables(loaded: tuple[Client, str]) -> None:
    client, url = loaded
    client.close()  # one process per chdb path: the command opens it
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")} | {"TALLY_CLICKHOUSE_URL": url}
    command = [sys.executable, "-m", "pipeline.cli", "stats", "--since", str(DAY), "--until", str(DAY)]
    out = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    stats = json.loads(out.stdout)
    assert stats["total_billing_records"] == 9
    assert stats["total_revenue"] == {"amount": "51.210300", "base_units": 51_210_300}
    table = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=120)
    assert "wallet_deduction" in table.stdout and "active accounts: 2" in table.stdout
    usage = subprocess.run(
        [*command[:4], "usage", "--since", str(DAY), "--until", str(DAY), "--account", "acct-b", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in usage.stdout.splitlines()]
    assert {line["service"] for line in lines} == {"api_gateway", "storage"}
    bad = subprocess.run(
        [*command[:4], "--since", "yesterday"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "--since" in bad.stderr
