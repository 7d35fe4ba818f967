"""Every Grafana panel's SQL, macros expanded as the ClickHouse plugin expands them, run against
the engine (chdb) on the known data set: columns and numbers, at each rollup grain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from clickhouse_connect.driver.client import Client

from pipeline.dashboards import DASHBOARDS, Panel, expand, panels
from sinks.clickhouse import ClickHouseSink, connect, migrate
from tests.integration.analytics_dataset import DAY, load

TEN = datetime(DAY.year, DAY.month, DAY.day, 10, tzinfo=UTC)
ELEVEN = TEN + timedelta(hours=1)
# Two hours (minute rollups), three days (hour rollups), a month (day rollups).
RANGES = {"2h": (TEN, TEN + timedelta(hours=2)), "3d": (TEN - timedelta(days=1), TEN + timedelta(days=2))}
RANGES["31d"] = (TEN - timedelta(days=15), TEN + timedelta(days=16))
HOURLY = 3600

# Events per hour and type: by event time (usage rollups) and by write time (accepted_1m), which
# the data set puts 5 minutes after the event time, in the same hours.
EVENTS_BY_TYPE: list[tuple[object, ...]] = [
    (TEN, "api.request.v1", 2),
    (TEN, "gpu.usage.v1", 2),
    (TEN, "storage.usage.v1", 1),
    (ELEVEN, "api.request.v1", 4),
    (ELEVEN, "gpu.usage.v1", 1),
]
# Per panel, over the two hours at a one-hour interval: (columns, rows).
EXPECTED: dict[str, tuple[tuple[str, ...], list[tuple[object, ...]]]] = {
    "Revenue by service (USDC)": (
        ("time", "service", "usdc"),
        [
            (TEN, "gpu_rental", Decimal("1.2")),
            (TEN, "model_inference", Decimal("0.0003")),
            (TEN, "storage", Decimal("0.01")),
            (ELEVEN, "api_gateway", Decimal("50")),
        ],
    ),
    "Usage events by type": (
        ("time", "type", "events"),
        EVENTS_BY_TYPE,
    ),
    "GPU hours by GPU model": (
        ("time", "gpu_model", "gpu_hours"),
        [(TEN, "a100", Decimal("0.033333")), (ELEVEN, "a100", Decimal("0.016666"))],  # 120 s and 60 s
    ),
    "GPU usage by provider and model": (
        ("provider_id", "gpu_model", "gpu_hours", "heartbeats"),
        [("prov-1", "a100", Decimal("0.05"), 3)],
    ),
    "Provider earnings and platform fees (USDC)": (
        ("provider_id", "provider_earnings", "platform_fees"),
        [("prov-1", Decimal("1.14"), Decimal("0.06"))],  # 1.2 charged, 0.06 (5%) to the platform
    ),
    "Top accounts by revenue": (
        ("account", "usdc", "charges"),
        [("acct-b", Decimal("50.01"), 3), ("acct-a", Decimal("1.2003"), 3)],
    ),
    "API requests by endpoint": (
        ("endpoint", "total_requests", "errors", "error_percent"),
        [("/v1/embed", 4, 0, 0.0), ("/v1/chat", 2, 1, 50.0)],
    ),
    "API requests by tier": (("tier", "requests", "overage_usdc"), [("startup", 1, Decimal("0"))]),
    "Accepted events per minute": (
        ("time", "type", "events"),
        EVENTS_BY_TYPE,
    ),
    "Rejected events by reason": (
        ("time", "reason", "rejections"),
        [(TEN, "malformed_json", 1), (TEN, "too_late", 2)],
    ),
    "Consumer lag by stage": (
        ("time", "consumer_group", "lag"),
        [(TEN, "tally-ledger", 3), (TEN, "tally-meter", 40)],  # the largest sample in the interval
    ),
    "Accounts near or below their low-balance threshold": (
        ("account", "balance_usdc", "threshold_usdc", "status"),
        [
            ("acct-a", Decimal("4"), Decimal("5"), "below"),
            ("acct-b", Decimal("6"), Decimal("5"), "near"),
        ],  # latest samples
    ),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    path: Path = tmp_path_factory.mktemp("dashboards") / "ch"
    engine = connect(f"chdb://{path}")
    migrate(engine)
    load(ClickHouseSink(engine))
    yield engine
    engine.close()


def test_every_panel_has_expected_results() -> None:
    found = {panel.title for panel in panels()}
    assert found == set(EXPECTED), f"panels without expectations or gone: {found ^ set(EXPECTED)}"
    assert {panel.dashboard for panel in panels()} == {
        "Tally: revenue and usage",
        "Tally: pipeline health and balances",
    }


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p.title)
def test_panel_returns_its_columns_and_numbers(client: Client, panel: Panel) -> None:
    columns, rows = EXPECTED[panel.title]
    result = client.query(expand(panel.sql, *RANGES["2h"], HOURLY))
    assert tuple(result.column_names) == columns
    assert [tuple(row) for row in result.result_rows] == rows


def totals(rows: list[tuple[object, ...]]) -> list[object]:
    """Per numeric column, its sum over the rows (what must not depend on the rollup grain)."""
    numbers = (
        [i for i, value in enumerate(rows[0]) if isinstance(value, int | Decimal | float)] if rows else []
    )
    return [sum(row[i] for row in rows) for i in numbers]  # type: ignore[misc]  # numbers only


@pytest.mark.parametrize("grain", ["3d", "31d"])
@pytest.mark.parametrize("panel", panels(), ids=lambda p: p.title)
def test_panel_totals_do_not_depend_on_the_rollup_grain(client: Client, panel: Panel, grain: str) -> None:
    daily = client.query(expand(panel.sql, *RANGES[grain], 86_400)).result_rows
    hourly = client.query(expand(panel.sql, *RANGES["2h"], HOURLY)).result_rows
    if "gpu_hours" in EXPECTED[panel.title][0] and panel.kind == "timeseries":
        # Hours are cut to 6 places per bucket: 120 s + 60 s is 0.049999 hourly, 0.05 daily.
        assert totals([tuple(r) for r in daily]) == [Decimal("0.05")]
        return
    assert totals([tuple(r) for r in daily]) == totals([tuple(r) for r in hourly])
    assert daily, "the data set lies inside every range"


def test_unknown_macros_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\$__conditionalAll"):
        expand("SELECT 1 WHERE $__conditionalAll(x, $y)", TEN, ELEVEN, 60)


def test_the_provisioned_data_source_is_the_one_every_panel_names() -> None:
    provisioning = DASHBOARDS.parent / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "clickhouse.yaml").read_text())["datasources"][0]
    assert (source["type"], source["jsonData"]["protocol"]) == ("grafana-clickhouse-datasource", "http")
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                assert target["datasource"] == {"type": source["type"], "uid": source["uid"]}, panel["title"]
    provider = yaml.safe_load((provisioning / "dashboards" / "tally.yaml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
