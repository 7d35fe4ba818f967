"""Exactly-once money: 100,000 events through ingest -> meter -> ledger on the real broker and
Postgres, with 5 SIGKILLs and a second worker joining and leaving, a price-book version taking
effect mid-stream and a quarter of the accounts changing plan mid-stream, must leave every
account's Postgres total equal to the independent judge's (pipeline/oracle.py), computed from the
produced events alone, to the base unit.

The judge does not window, close, adjust or carry quota state: it rates each accepted event by
the plan and version in force at its time and rounds each billing period once (docs/PRICING.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import create_engine

from pipeline.loadgen import Expected, LoadPlan, Message, account_ids, default_now, generate
from pipeline.oracle import TIERS, accepted_events, oracle, store_plans, tier_plans
from pipeline.outputs import OutputReader
from pipeline.settings import REPO_ROOT, Settings
from pipeline.testing import Fault, Worker, isolated_settings, publish_with_faults
from sinks.postgres import account_totals, change_plan, customer_balances, ledger_check, sqlalchemy_url

EVENTS = 100_000
# events/s published: ~50 s of input. Publishing is also held to a tenth of the stream ahead
# of the outputs (publish_with_faults), so the join and leave rebalances, which stall outputs
# ~10 s, cannot let the whole backlog through before the last faults' marks.
RATE = 2_000.0


async def drive(
    settings: Settings, messages: list[Message], must: int, faults: Sequence[tuple[float, Fault]]
) -> None:
    """Publish, and fire each fault when the accepted + rejected outputs reach its fraction."""
    async with OutputReader(settings, keep_identities=False) as reader:
        await reader.start_from(await reader.snapshot())
        await publish_with_faults(settings, messages, reader, must, faults, rate=RATE)
        await reader.read_until(must, idle_timeout_s=120, drain_s=2)


# A second version of the default book, taking effect mid-stream: other API, product, GPU and
# compute prices (appended to the book's text, so the first version is the repository's).
SECOND_VERSION = """
  - effective_from: "{at}"
    gpu:
      base_rate_per_hour: {{rtx_4090: "0.61", a100: "2.37", h100: "4.13"}}
      power_rate_per_watt_hour: "0.0012"
      platform_fee_percent: "7"
    api_tiers:
      startup:    {{monthly_fee: "50",   included_requests: 10000,  overage_per_request: "0.013"}}
      growth:     {{monthly_fee: "250",  included_requests: 100000, overage_per_request: "0.004"}}
      enterprise: {{monthly_fee: "1000", included_requests: 500000, overage_per_request: "0.0021"}}
    products:
      gpt-4:       {{unit: token, pricing: {{model: per_unit, unit_price: "0.0031"}}}}
      claude-3:    {{unit: token, pricing: {{model: per_unit, unit_price: "0.0017", included: "1000"}}}}
      llama-3-70b: {{unit: token, pricing: {{model: tiered_graduated, tiers: [
                      {{up_to: "1000000", unit_price: "0.0009"}}, {{unit_price: "0.0004"}}]}}}}
      embed-small: {{unit: token, pricing: {{model: package, package_size: "1000", package_price: "0.012"}}}}
    compute_per_hour:
      free:       {{small: "0.06",  medium: "0.08",  large: "0.11", gpu: "0.27"}}
      pro:        {{small: "0.03",  medium: "0.04",  large: "0.06", gpu: "0.13"}}
      enterprise: {{small: "0.011", medium: "0.016", large: "0.021", gpu: "0.051"}}
    storage_per_gb_month: {{bucket: "0.023", filestore: "0.19"}}
"""


def test_money_totals_are_exact_after_five_sigkills_and_a_rebalance(tmp_path: Path) -> None:
    # Event times follow the wall clock of publishing, as a live stream's do, plus 3% of events
    # stamped 6-10 minutes back: later than the grace, so adjustments, several per window.
    span = int(EVENTS / RATE)
    now = default_now() + timedelta(seconds=span)
    version_at = (now - timedelta(seconds=span // 2)).replace(microsecond=0)
    books = tmp_path / "books"
    books.mkdir()
    default_text = (REPO_ROOT / "schemas" / "pricebooks" / "default.yaml").read_text(encoding="utf-8")
    later_prices = SECOND_VERSION.format(at=version_at.strftime("%Y-%m-%dT%H:%M:%SZ"))
    (books / "default.yaml").write_text(default_text + later_prices, encoding="utf-8")
    settings = isolated_settings(
        tmp_path,
        accounts=200,
        window_idle_close="PT3S",
        window_grace="PT20S",
        session_idle_timeout="PT30S",
        price_books_dir=books,
    )
    accounts = account_ids(200)
    plans = tier_plans(accounts)
    engine = create_engine(sqlalchemy_url(settings))
    store_plans(engine, plans)
    # A quarter of the accounts change plan a third of the way in (tiers round robin, one to none).
    moved_at = (now - timedelta(seconds=2 * span // 3)).replace(microsecond=0)
    changes: dict[str, list[tuple[datetime, str | None]]] = {}
    for i, account in enumerate(accounts[::4]):
        tier = (*TIERS, None)[i % 4]
        changes[account] = [(moved_at, tier)]
        change_plan(engine, account, tier, moved_at, actor="test")

    expected = Expected()
    load = [
        LoadPlan(
            EVENTS // 2,
            200,
            batch_size=size,
            seed=seed,
            ordered_time=True,
            late_fraction=0.03,
            time_span_s=span,
        )
        for size, seed in ((1, 41), (100, 42))
    ]
    messages = [m for plan in load for m in generate(plan, now, expected)]
    must = len(expected.accepted) + sum(expected.rejected.values())
    want = oracle(settings, accepted_events(messages, expected), plans, changes)

    first = Worker(settings, "worker-1").start()
    second = Worker(settings, "worker-2")

    async def kill() -> None:
        first.kill()
        first.start()

    async def join() -> None:
        second.start()
        await asyncio.to_thread(second.wait_for_log, "took partition", 60)

    async def leave() -> None:
        await asyncio.to_thread(second.stop)

    faults = [(0.08, kill), (0.2, kill), (0.3, join), (0.45, kill), (0.55, leave), (0.65, kill), (0.8, kill)]
    try:
        asyncio.run(drive(settings, messages, must, faults))
        # The last windows close 20 s (the grace) after their end, once the input has been idle 3 s.
        deadline = time.monotonic() + 180
        got = account_totals(engine)
        while got != want and time.monotonic() < deadline:
            time.sleep(2)
            got = account_totals(engine)
        debits, credits, balances = ledger_check(engine)
        customers = sum(balance for _, balance, _ in customer_balances(engine))
    finally:
        first.stop()
        second.stop()
        engine.dispose()
    assert first.starts == 6
    assert "took partition" in second.log() and "released partition" in first.log()
    missing = {a: (want.get(a), got.get(a)) for a in set(want) | set(got) if want.get(a) != got.get(a)}
    assert not missing, (
        f"{len(missing)} accounts differ (oracle, postgres): {dict(list(missing.items())[:5])}"
    )
    assert sum(got.values()) == sum(want.values()) > 0
    assert debits == credits >= sum(want.values())  # a credit swaps its entries' sides
    assert balances == 0 and customers == -sum(want.values())
    with psycopg.connect(settings.postgres_url) as connection:

        def count(sql: str, *args: object) -> int:
            (found,) = connection.execute(sql, args).fetchone() or (0,)
            return int(found)

        # Adjustments happened (late events beyond the grace), and were charged as new revisions.
        assert count("SELECT count(*) FROM charges WHERE revision > 0") > 0
        # Usage was rated on both sides of the version change and of the plan changes.
        label = version_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert count("SELECT count(*) FROM charges WHERE price_version = %s", label) > 0
        assert count("SELECT count(*) FROM charges WHERE price_version <> %s", label) > 0
        # An account that changed tier paid both tiers' fees this period.
        assert (
            count(
                "SELECT count(*) FROM (SELECT account_id FROM charges WHERE meter = 'api_fee'"
                " GROUP BY 1 HAVING count(DISTINCT dimensions) > 1) t"
            )
            > 0
        )
