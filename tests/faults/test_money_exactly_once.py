"""Exactly-once money: 100,000 events through ingest -> meter -> ledger on the real broker and
Postgres, with 5 SIGKILLs and a second worker joining and leaving, must leave every account's
Postgres total equal to an oracle computed from the produced events alone, to the base unit.

The oracle does not window, close, adjust or carry quota state: it groups the accepted events
by what a charge is for (a GPU or storage window, an API or product billing period) and prices
each group once from the price book (the rule docs/PRICING.md states for windows and periods).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import msgspec
import psycopg
from sqlalchemy import create_engine

from agents.rating import price
from pipeline.loadgen import Expected, LoadPlan, Message, account_ids, default_now, generate, publish
from pipeline.outputs import OutputReader
from pipeline.settings import Settings
from pipeline.testing import Worker, isolated_settings
from schemas.events import ApiRequestEvent, GpuUsageEvent, StorageUsageEvent, UsageEvent, event_decoder
from schemas.pricebook import load_price_book
from sinks.postgres import sqlalchemy_url, upsert_accounts, upsert_plans

Fault = Callable[[], Awaitable[None]]
EVENTS = 100_000
RATE = 3_000.0  # events/s published: ~35 s of input, so every fault lands mid-stream
TIERS = ("startup", "growth", "enterprise")


def plans_for(accounts: list[str]) -> dict[str, str | None]:
    """A tier for three of every four accounts; the fourth has no plan (the default book)."""
    return {a: (TIERS[i % 4] if i % 4 < 3 else None) for i, a in enumerate(accounts)}


def accepted_events(messages: list[Message], expected: Expected) -> list[UsageEvent]:
    """The first copy of every event the pipeline must accept, decoded from the produced bytes."""
    seen: set[tuple[str, str]] = set()
    events: list[UsageEvent] = []
    for message in messages:
        try:
            raw = msgspec.json.decode(message.value)
        except msgspec.DecodeError:
            continue
        for item in raw if isinstance(raw, list) else [raw]:
            if not isinstance(item, dict):
                continue
            identity = (item.get("source"), item.get("id"))
            if identity in expected.accepted and identity not in seen:
                seen.add(identity)
                events.append(event_decoder.decode(msgspec.json.encode(item)))
    assert len(events) == len(expected.accepted)
    return events


def oracle(events: list[UsageEvent], plans: dict[str, str | None]) -> dict[str, int]:
    """Exact rational arithmetic (``Fraction``), rounded half-even to base units once per group:
    no Decimal context, no shared code with the meter beyond the price book's numbers."""
    book = load_price_book(Path(__file__).resolve().parents[2] / "schemas" / "pricebooks" / "default.yaml")
    unit = Fraction(10) ** book.token.decimals
    windows: dict[tuple[str, str, str, int], Fraction] = defaultdict(Fraction)
    periods: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
    for e in events:
        version = book.version_at(e.time)
        minute = int(e.time.timestamp()) // 60
        month = e.time.astimezone(UTC).strftime("%Y-%m")
        if isinstance(e, GpuUsageEvent):
            g = e.data
            rates = version.gpu
            assert rates is not None
            hourly = Fraction(rates.base_rate_per_hour[g.gpu_model]) * Fraction(
                g.vram_allocated_gb
            ) / Fraction(g.vram_total_gb) + Fraction(g.power_watts) * Fraction(rates.power_rate_per_watt_hour)
            minutes = -(-g.interval_seconds // 60) * g.gpu_count  # per-minute billing, rounded up
            windows[(e.subject, "gpu", f"{g.gpu_model}/{g.provider_id}", minute)] += minutes * hourly / 60
        elif isinstance(e, StorageUsageEvent):
            per_month = Fraction(version.storage_per_gb_month[e.data.storage_kind])
            gb_months = Fraction(e.data.gb) * e.data.duration_seconds / (3600 * 720)
            windows[(e.subject, "storage", e.data.storage_kind, minute)] += gb_months * per_month
        elif isinstance(e, ApiRequestEvent):
            tier = plans[e.subject]
            if tier is not None:
                periods[(e.subject, f"tier:{tier}", month)] += e.data.request_count
            if e.data.product_id in version.products:
                periods[(e.subject, f"product:{e.data.product_id}", month)] += (
                    e.data.tokens_in + e.data.tokens_out
                )
    totals: dict[str, int] = defaultdict(int)
    for (account, *_), amount in windows.items():
        totals[account] += round(amount * unit)  # round() of a Fraction is half-even
    version = book.versions[-1]
    for (account, what, _), used in periods.items():
        kind, _, name = what.partition(":")
        if kind == "tier":
            api = version.api_tiers[name]
            overage = max(Fraction(0), used - api.included_requests) * Fraction(api.overage_per_request)
            totals[account] += round(Fraction(api.monthly_fee) * unit) + round(overage * unit)
        else:
            totals[account] += round(
                Fraction(price(version.products[name].pricing, Decimal(int(used)))) * unit
            )
    return dict(totals)


def postgres_totals(settings: Settings) -> tuple[dict[str, int], int, int, int]:
    """Per-account charge totals, debits, credits, and the sum of all balances."""
    with psycopg.connect(settings.postgres_url) as connection:
        totals: dict[str, int] = dict(
            connection.execute(
                "SELECT account_id, sum(amount_base_units)::bigint FROM charges GROUP BY 1"
            ).fetchall()
        )
        debits, credits = connection.execute(
            "SELECT coalesce(sum(amount_base_units) FILTER (WHERE side = 'debit'), 0),"
            " coalesce(sum(amount_base_units) FILTER (WHERE side = 'credit'), 0) FROM ledger_entries"
        ).fetchone() or (0, 0)
        (balances,) = connection.execute(
            "SELECT coalesce(sum(balance_base_units), 0) FROM balances"
        ).fetchone() or (0,)
    return {a: t for a, t in totals.items() if t}, int(debits), int(credits), int(balances)


async def drive(
    settings: Settings, messages: list[Message], must: int, faults: Sequence[tuple[float, Fault]]
) -> None:
    """Publish, and fire each fault when the accepted + rejected outputs reach its fraction."""
    async with OutputReader(settings, keep_identities=False) as reader:
        await reader.start_from(await reader.snapshot())
        publisher = asyncio.create_task(publish(settings, messages, rate=RATE, chunk=200))
        pending = sorted(faults, key=lambda f: f[0])
        while pending:
            await reader.poll()
            if reader.outputs.total >= pending[0][0] * must:
                assert reader.outputs.total < must, "the fault must land while input is still unprocessed"
                _, fault = pending.pop(0)
                await fault()
        await publisher
        await reader.read_until(must, idle_timeout_s=120, drain_s=2)


def test_money_totals_are_exact_after_five_sigkills_and_a_rebalance(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, accounts=200, window_idle_close="PT3S", window_grace="PT20S")
    accounts = account_ids(200)
    plans = plans_for(accounts)
    engine = create_engine(sqlalchemy_url(settings))
    upsert_plans(engine, [{"name": t, "price_book": "default", "api_tier": t} for t in TIERS])
    upsert_accounts(engine, list(plans.items()))
    engine.dispose()

    expected = Expected()
    # Event times follow the wall clock of publishing, as a live stream's do, plus 3% of events
    # stamped 6-10 minutes back: later than the grace, so adjustments, several per window.
    span = int(EVENTS / RATE)
    now = default_now() + timedelta(seconds=span)
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
    want = oracle(accepted_events(messages, expected), plans)

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
        got, debits, credits, balances = postgres_totals(settings)
        while got != want and time.monotonic() < deadline:
            time.sleep(2)
            got, debits, credits, balances = postgres_totals(settings)
    finally:
        first.stop()
        second.stop()
    assert first.starts == 6
    assert "took partition" in second.log() and "released partition" in first.log()
    missing = {a: (want.get(a), got.get(a)) for a in set(want) | set(got) if want.get(a) != got.get(a)}
    assert not missing, (
        f"{len(missing)} accounts differ (oracle, postgres): {dict(list(missing.items())[:5])}"
    )
    assert sum(got.values()) == sum(want.values()) > 0
    assert debits == credits == sum(want.values())
    assert balances == 0
    # Adjustments happened (late events beyond the grace), and were charged as new revisions.
    with psycopg.connect(settings.postgres_url) as connection:
        (revisions,) = connection.execute("SELECT count(*) FROM charges WHERE revision > 0").fetchone() or (
            0,
        )
    assert revisions > 0
