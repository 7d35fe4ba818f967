"""docs/PRICING.md's rules against a running worker (real Kafka and Postgres): prices and plans by
event time, failed requests, rounding once per period, GPU and compute sessions; each account's
amount due is written here from the rule, and `tally quote` must charge the same events the same,
to the base unit, as must the independent judge (pipeline/oracle.py).

Event times are relative to the run: within one UTC month, a couple of hours back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Engine, create_engine, text

from pipeline.oracle import Judge, PlanDef
from pipeline.producer import TallyProducer
from pipeline.settings import REPO_ROOT, Settings
from pipeline.testing import Worker, isolated_settings, settings_env
from schemas.events import event_decoder
from schemas.pricebook import load_price_book
from sinks.postgres import change_plan, sqlalchemy_url, upsert_accounts, upsert_plans

USDC = 1_000_000
TALLY = str(Path(sys.executable).with_name("tally"))


def base_time() -> datetime:
    """A whole hour 2-3 hours back whose next three hours share its UTC month (so a scenario's
    billing period is one)."""
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    while (start + timedelta(hours=3)).month != start.month:
        start -= timedelta(hours=3)
    return start


def units(amount: str) -> int:
    return int(Decimal(amount) * USDC)


RULES = """name: rules
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {{rtx_4090: "0.50", a100: "2.00"}}
      power_rate_per_watt_hour: "0.001"
      provider_minimum_per_hour: {{p-min: "1.20"}}
    api_tiers:
      startup: {{monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}}
      growth: {{monthly_fee: "250", included_requests: 100000, overage_per_request: "0.005"}}
    products:
      gpt-4: {{unit: token, pricing: {{model: per_unit, unit_price: "0.002"}}}}
      drop: {{pricing: {{model: per_unit, unit_price: "0.01"}}}}
      claude-3: {{unit: token, pricing: {{model: per_unit, unit_price: "0.0015", included: "1000"}}}}
    compute_per_hour: {{enterprise: {{medium: "0.015"}}}}
    storage_per_gb_month: {{bucket: "0.02"}}
  - effective_from: "{v2}"
    gpu:
      base_rate_per_hour: {{rtx_4090: "1.00", a100: "2.00"}}
      power_rate_per_watt_hour: "0.001"
    api_tiers:
      startup: {{monthly_fee: "50", included_requests: 10000, overage_per_request: "0.02"}}
      growth: {{monthly_fee: "250", included_requests: 100000, overage_per_request: "0.005"}}
    products:
      gpt-4: {{unit: token, pricing: {{model: per_unit, unit_price: "0.004"}}}}
      drop: {{pricing: {{model: per_unit, unit_price: "0.001"}}}}
      claude-3: {{unit: token, pricing: {{model: per_unit, unit_price: "0.0015", included: "1000"}}}}
    compute_per_hour: {{enterprise: {{medium: "0.03"}}}}
    storage_per_gb_month: {{bucket: "0.02"}}
"""
PLANS = {
    "r-startup": PlanDef("rules", "startup", "enterprise"),
    "r-growth": PlanDef("rules", "growth", "enterprise"),
    "r-none": PlanDef("rules", None, "enterprise"),
}


class Scenario:
    """Events of many accounts, in publishing order, with each account's plan history."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.plans: dict[str, list[tuple[datetime | None, str]]] = {}
        self.due: dict[str, int] = {}

    def add(self, kind: str, at: datetime, account: str, **data: Any) -> None:
        self.events.append(
            {
                "specversion": "1.0",
                "id": f"{account}-{len(self.events)}",
                "source": "rules-test",
                "type": kind,
                "time": at.isoformat(),
                "subject": account,
                "data": data,
            }
        )

    def api(self, at: datetime, account: str, requests: int = 0, **data: Any) -> None:
        self.add("api.request.v1", at, account, endpoint="/v1", request_count=requests, **data)

    def gpu(self, at: datetime, account: str, seconds: int = 60, **data: Any) -> None:
        heartbeat = {
            "session_id": "s",
            "provider_id": "p",
            "node_id": "n",
            "gpu_model": "rtx_4090",
            "vram_total_gb": "24",
            "vram_allocated_gb": "24",
            "power_watts": "0",
            "utilization": "0.5",
            "interval_seconds": seconds,
        }
        self.add("gpu.usage.v1", at, account, **{**heartbeat, **data})


def scenario(t: datetime) -> Scenario:
    """Every account's usage and, beside it, its amount due by the rule (comments: arithmetic)."""
    v2 = t + timedelta(minutes=30)
    s = Scenario()
    # 1. Prices by event time: version 2 from v2 raises startup overage 0.01 -> 0.02, gpt-4 0.002
    # -> 0.004, lowers "drop" 0.01 -> 0.001, doubles the rtx_4090.
    s.plans["acct-price"] = [(None, "r-startup")]
    s.api(v2 - timedelta(minutes=8), "acct-price", 12_000)
    s.api(v2 + timedelta(minutes=5), "acct-price", 1)
    s.due["acct-price"] = units("50") + units("20") + units("0.02")
    s.plans["acct-gpt"] = [(None, "r-none")]
    s.api(v2 - timedelta(minutes=8), "acct-gpt", product_id="gpt-4", tokens_in=1000)
    s.api(v2 + timedelta(minutes=5), "acct-gpt", product_id="gpt-4", tokens_in=1)
    s.due["acct-gpt"] = units("2") + units("0.004")
    s.plans["acct-drop"] = [(None, "r-none")]
    s.api(v2 - timedelta(minutes=8), "acct-drop", product_id="drop", tokens_in=1000)
    s.api(v2 + timedelta(minutes=5), "acct-drop", product_id="drop", tokens_in=1000)
    s.due["acct-drop"] = units("10") + units("1")
    s.plans["acct-beat"] = [(None, "r-none")]
    s.gpu(v2 - timedelta(seconds=20), "acct-beat", session_id="a")  # 0.50/h for a minute
    s.gpu(v2 + timedelta(seconds=10), "acct-beat", session_id="b")  # 1.00/h for a minute
    s.due["acct-beat"] = units("0.025")
    # 2. Plans by event time: a downgrade and an upgrade while the window is open.
    s.plans["acct-down"] = [(None, "r-growth"), (t + timedelta(minutes=10, seconds=30), "r-startup")]
    s.api(t + timedelta(minutes=10, seconds=10), "acct-down", 50_000)
    s.due["acct-down"] = units("250") + units("50")  # inside growth's quota: each fee, no overage
    s.plans["acct-up"] = [(None, "r-startup"), (t + timedelta(minutes=11, seconds=30), "r-growth")]
    s.api(t + timedelta(minutes=11, seconds=10), "acct-up", 5_000)
    s.api(t + timedelta(minutes=11, seconds=40), "acct-up", 1)
    s.due["acct-up"] = units("50") + units("250")
    # 4. Failed requests are metered, not charged.
    s.plans["acct-fail"] = [(None, "r-startup")]
    s.api(t + timedelta(minutes=12), "acct-fail", 10_000)
    s.api(t + timedelta(minutes=12), "acct-fail", 500, status=503)
    s.api(t + timedelta(minutes=12), "acct-fail", 0, status=500, product_id="gpt-4", tokens_in=1000)
    s.due["acct-fail"] = units("50")
    # 5. Rounding once per period: an hour of a whole rtx_4090 (0.50/h) in minute windows.
    s.plans["acct-card"] = [(None, "r-none")]
    for minute in range(60):
        s.gpu(t - timedelta(minutes=60 - minute), "acct-card")
    s.due["acct-card"] = units("0.50")
    # 6. GPU sessions: three 20 s heartbeats are a minute; six 30 s ones three minutes.
    s.plans["acct-sess3"] = [(None, "r-none")]
    for i in range(3):
        s.gpu(t + timedelta(minutes=13, seconds=20 * i), "acct-sess3", 20)
    s.add("session.ended.v1", t + timedelta(minutes=14), "acct-sess3", session_id="s")
    s.due["acct-sess3"] = units("0.008333")
    s.plans["acct-sess6"] = [(None, "r-none")]
    for i in range(6):
        s.gpu(t + timedelta(minutes=15, seconds=30 * i), "acct-sess6", 30)
    s.due["acct-sess6"] = units("0.025")  # ended by the idle timeout
    s.plans["acct-floor"] = [(None, "r-none")]
    for minute in range(60):  # a quarter card (0.125/h) of a provider with a 1.20/h minimum
        s.gpu(t - timedelta(minutes=60 - minute), "acct-floor", vram_allocated_gb="6", provider_id="p-min")
    s.due["acct-floor"] = units("1.20")
    # 7. Compute sessions across version 2, in either order: 2,250 s at 0.015/h + 4,950 s at 0.03/h.
    start = v2 - timedelta(seconds=2250)
    for account, end_first in (("acct-se", False), ("acct-es", True)):
        s.plans[account] = [(None, "r-none")]
        ends: list[tuple[str, datetime, dict[str, Any]]] = [
            ("session.started.v1", start, {"session_id": "c", "resource_tier": "medium"}),
            ("session.ended.v1", start + timedelta(hours=2), {"session_id": "c", "duration_seconds": 7200}),
        ]
        for kind, at, data in reversed(ends) if end_first else ends:
            s.add(kind, at, account, **data)
        s.due[account] = units("0.009375") + units("0.04125")
    s.plans["acct-twice"] = [(None, "r-none")]
    s.add("session.started.v1", t, "acct-twice", session_id="c", resource_tier="medium")
    s.add(
        "session.started.v1", t + timedelta(minutes=19), "acct-twice", session_id="c", resource_tier="medium"
    )
    s.add("session.ended.v1", t + timedelta(minutes=20), "acct-twice", session_id="c")
    s.due["acct-twice"] = units("0.005")  # the first start wins: 20 minutes at 0.015/h
    # 8. A free allowance over the period.
    s.plans["acct-claude"] = [(None, "r-none")]
    for i, tokens in enumerate([600, 600, 1600]):
        s.api(t + timedelta(minutes=16 + i), "acct-claude", product_id="claude-3", tokens_in=tokens)
    s.due["acct-claude"] = units("2.70")
    return s


def store_scenario(engine: Engine, s: Scenario) -> None:
    upsert_plans(
        engine,
        [
            {
                "name": name,
                "price_book": p.book,
                "api_tier": p.api_tier,
                "compute_user_type": p.compute_user_type,
            }
            for name, p in PLANS.items()
        ],
    )
    upsert_accounts(engine, [(account, history[0][1]) for account, history in s.plans.items()])
    for account, history in s.plans.items():
        for when, plan in history[1:]:
            assert when is not None
            change_plan(engine, account, plan, when, actor="test")


async def publish_in_order(settings: Settings, events: list[dict[str, Any]]) -> None:
    """One message per event, keyed by account, in order (so an end can precede its start)."""
    async with TallyProducer(settings) as producer:
        await producer.send_raw([(e["subject"].encode(), msgspec.json.encode(e)) for e in events])


def totals(engine: Engine) -> dict[str, int]:
    with engine.connect() as db:
        rows = db.execute(text("SELECT account_id, sum(amount_base_units)::bigint FROM charges GROUP BY 1"))
        return {account: int(total) for account, total in rows}


def wait_for(engine: Engine, due: dict[str, int], timeout: float = 150) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    got = totals(engine)
    while any(got.get(a) != v for a, v in due.items()) and time.monotonic() < deadline:
        time.sleep(1)
        got = totals(engine)
    return got


def quote_lines(s: Scenario) -> list[str]:
    """The same events for `tally quote`, each account's plans as plan lines."""
    lines = []
    for account, history in s.plans.items():
        for when, plan in history:
            p = PLANS[plan]
            at = (when or datetime(2026, 1, 1, tzinfo=UTC)).isoformat()
            lines.append(
                json.dumps(
                    {
                        "subject": account,
                        "time": at,
                        "plan": {"api_tier": p.api_tier, "compute_user_type": p.compute_user_type},
                    }
                )
            )
    return lines + [json.dumps(e) for e in s.events]


def test_a_running_worker_charges_by_the_rules_and_tally_quote_agrees(tmp_path: Path) -> None:
    t = base_time()
    books = tmp_path / "books"
    books.mkdir()
    (books / "default.yaml").write_bytes((REPO_ROOT / "schemas" / "pricebooks" / "default.yaml").read_bytes())
    v2 = (t + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (books / "rules.yaml").write_text(RULES.format(v2=v2), encoding="utf-8")
    settings = isolated_settings(
        tmp_path,
        accounts=0,
        accounts_file=None,
        price_books_dir=books,
        window_grace="PT20S",
        window_idle_close="PT3S",
        session_idle_timeout="PT10S",
    )
    engine = create_engine(sqlalchemy_url(settings))
    s = scenario(t)
    store_scenario(engine, s)
    worker = Worker(settings).start()
    try:
        worker.wait_for_log("took partition", 60, count=2 * settings.partitions)
        asyncio.run(publish_in_order(settings, s.events))
        got = wait_for(engine, s.due)
        assert worker.alive()
    finally:
        worker.stop()
    wrong = {a: (v, got.get(a)) for a, v in s.due.items() if got.get(a) != v}
    assert not wrong, f"(due, charged) per account: {wrong}"
    # The judge shares nothing with the meter and agrees.
    judge = Judge(
        {"rules": load_price_book(books / "rules.yaml")},
        "rules",
        {
            account: [(int(w.timestamp()) if w else -(2**63), PLANS[plan]) for w, plan in history]
            for account, history in s.plans.items()
        },
    )
    events = [event_decoder.decode(msgspec.json.encode(e)) for e in s.events]
    accepted = [e for e in events if not (e.subject == "acct-twice" and e.time == t + timedelta(minutes=19))]
    assert {a: v for a, v in judge.totals(accepted).items() if v} == s.due
    # `tally quote` on the same events: the same charges per account, to the base unit.
    result = subprocess.run(
        [TALLY, "quote", "--price-book", str(books / "rules.yaml")],
        input="\n".join(quote_lines(s)) + "\n",
        capture_output=True,
        text=True,
        check=True,
        env=settings_env(settings),
    )
    *lines, summary = [json.loads(line) for line in result.stdout.splitlines()]
    assert summary["accounts"] == s.due
    errors = [line for line in lines if "error" in line]
    assert [e["error"] for e in errors] == ["session_conflict"]
    by_meter: dict[tuple[str, str], int] = defaultdict(int)
    for line in lines:
        if "meter" in line:
            by_meter[(line["account"], line["meter"])] += line["amount_base_units"]
    with engine.connect() as db:
        stored = {
            (a, m): int(v)
            for a, m, v in db.execute(
                text("SELECT account_id, meter, sum(amount_base_units)::bigint FROM charges GROUP BY 1, 2")
            )
        }
    engine.dispose()
    assert by_meter == stored
