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
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import psycopg
from sqlalchemy import create_engine

from pipeline.loadgen import Expected, LoadPlan, Message, account_ids, default_now, generate
from pipeline.oracle import accepted_events, oracle, store_plans, tier_plans
from pipeline.outputs import OutputReader
from pipeline.settings import Settings
from pipeline.testing import Fault, Worker, isolated_settings, publish_with_faults
from sinks.postgres import account_totals, ledger_check, sqlalchemy_url

EVENTS = 100_000
# events/s published: ~50 s of input, so every fault lands mid-stream. At 3,000 (~33 s) a run
# failed that precondition: the join and leave rebalances stalled outputs ~10 s, the backlog was
# then committed in a few large transactions, and outputs went past the last two faults' marks
# together, after the whole stream had been published.
RATE = 2_000.0


async def drive(
    settings: Settings, messages: list[Message], must: int, faults: Sequence[tuple[float, Fault]]
) -> None:
    """Publish, and fire each fault when the accepted + rejected outputs reach its fraction."""
    async with OutputReader(settings, keep_identities=False) as reader:
        await reader.start_from(await reader.snapshot())
        await publish_with_faults(settings, messages, reader, must, faults, rate=RATE)
        await reader.read_until(must, idle_timeout_s=120, drain_s=2)


def test_money_totals_are_exact_after_five_sigkills_and_a_rebalance(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, accounts=200, window_idle_close="PT3S", window_grace="PT20S")
    accounts = account_ids(200)
    plans = tier_plans(accounts)
    engine = create_engine(sqlalchemy_url(settings))
    store_plans(engine, plans)

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
    want = oracle(settings, accepted_events(messages, expected), plans)

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
    assert debits == credits == sum(want.values())
    assert balances == 0
    # Adjustments happened (late events beyond the grace), and were charged as new revisions.
    with psycopg.connect(settings.postgres_url) as connection:
        (revisions,) = connection.execute("SELECT count(*) FROM charges WHERE revision > 0").fetchone() or (
            0,
        )
    assert revisions > 0
