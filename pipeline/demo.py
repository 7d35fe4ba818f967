"""``tally demo``: the pipeline end to end on the local stack, from usage to money.

Each run gets topics, consumer groups and a Postgres database of its own (its numbers are its own;
the names are printed). It puts three of every four accounts on an API tier, starts a worker
process, publishes synthetic usage (half as single-event messages, half as 100-event batches, with
duplicates, 1% late events and every kind of bad input; event times ascending through the last hour
as a live stream's are), and prints:
1. what came out of ``usage.accepted`` and ``usage.rejected`` (read-committed) beside what had to;
2. once the last windows have closed, per account from Postgres: usage, charges and balance; the
   platform's fees and the providers' earnings; and whether every account's total equals the
   independent reference (``pipeline.oracle``) and debits equal credits;
3. from ClickHouse, read over the worker's HTTP interface: usage by GPU model and revenue per
   hour, and whether ClickHouse's charges equal Postgres' on every account and day.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from decimal import Decimal

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine

from pipeline.loadgen import Expected, LoadPlan, Message, account_ids, default_now, generate, publish
from pipeline.oracle import accepted_events, oracle, store_plans, tier_plans
from pipeline.outputs import OutputReader, Outputs
from pipeline.reconcile import reconcile
from pipeline.settings import Settings, mask_url
from pipeline.testing import Worker, isolated_settings
from sinks.clickhouse import reader
from sinks.postgres import account_totals, account_usage, earnings, ledger_check, sqlalchemy_url

# Windows close 30 s after their end (the demo's grace) once a partition has been idle 5 s; the
# data ends 90 s before it is generated, so its last window closes as soon as the input stops.
DEMO_WINDOWS = {"window_grace": "PT30S", "window_idle_close": "PT5S"}
SHOWN_ACCOUNTS = 12


async def run_demo(settings: Settings, *, events: int, accounts: int, console: Console) -> int:
    work = settings.data_dir / "demo"
    run = await asyncio.to_thread(isolated_settings, work, accounts, "demo", **DEMO_WINDOWS)
    console.print(
        f"demo run [bold]{run.app_id}[/bold]: topics {run.app_id}.*, "
        f"Postgres {mask_url(run.postgres_url)}, windows of {run.window_size.seconds} s"
    )
    plans = tier_plans(account_ids(accounts))
    engine = create_engine(sqlalchemy_url(run))
    store_plans(engine, plans)

    worker = Worker(run, "demo-worker").start()
    assert worker.process is not None
    # Ready when the money path's two stages (meter, ledger) hold every partition.
    await asyncio.to_thread(worker.wait_for_log, "took partition", 120, 2 * run.partitions)
    console.print(f"worker started and ready (pid {worker.process.pid}), log {worker.log_path}")
    expected = Expected()
    messages: list[Message] = []
    try:
        async with OutputReader(run) as reader:
            await reader.start_from(await reader.snapshot())
            # The first half hour as single-event messages, the second as batches: one stream
            # whose time moves forward, as a live one's does.
            end = default_now() - timedelta(seconds=90)
            started = time.monotonic()
            for shape, batch_size, now in (
                ("single-event messages", 1, end - timedelta(minutes=30)),
                ("100-event batches", 100, end),
            ):
                plan = LoadPlan(
                    events=events // 2,
                    accounts=accounts,
                    batch_size=batch_size,
                    seed=batch_size,
                    max_event_bytes=run.max_event_bytes,
                    max_message_bytes=run.max_message_bytes,
                    ordered_time=True,
                    late_fraction=0.01,
                    time_span_s=1800,
                )
                part = list(generate(plan, now, expected))
                messages += part
                sent, seconds = await publish(run, part)
                console.print(f"published {sent:,} events as {shape} in {seconds:.1f} s")
            must_total = len(expected.accepted) + sum(expected.rejected.values())
            outputs = await reader.read_until(must_total, idle_timeout_s=60)
        flow_ok = print_outputs(console, expected, outputs, started)
        want = oracle(run, accepted_events(messages, expected), plans)
        got = await settle(engine, want, timeout_s=120)
        money_ok = print_money(console, engine, want, got)
        analytics_ok = await asyncio.to_thread(print_analytics, console, engine, run)
    finally:
        worker.stop()
        engine.dispose()
    return 0 if flow_ok and money_ok and analytics_ok else 1


def print_outputs(console: Console, expected: Expected, outputs: Outputs, started: float) -> bool:
    table = Table(title="What came out of the pipeline")
    table.add_column("outcome")
    table.add_column("expected", justify="right")
    table.add_column("got", justify="right")
    table.add_row("accepted", f"{len(expected.accepted):,}", f"{outputs.accepted:,}")
    table.add_row("duplicates dropped", f"{expected.duplicates:,}", f"{expected.events - outputs.total:,}")
    for reason in sorted(set(expected.rejected) | set(outputs.rejected)):
        table.add_row(f"rejected: {reason}", str(expected.rejected[reason]), str(outputs.rejected[reason]))
    console.print(table)
    if outputs.first_seen is not None and outputs.last_seen is not None:
        end_to_end = outputs.last_seen - started
        draining = max(outputs.last_seen - outputs.first_seen, 1e-3)
        console.print(
            f"throughput: {expected.events:,} events in {end_to_end:.1f} s from the first publish to the "
            f"last output ({expected.events / end_to_end:,.0f} events/s, publishing included); "
            f"{outputs.total:,} outputs in {draining:.1f} s from the first output to the last "
            f"({outputs.total / draining:,.0f} outputs/s)"
        )
    ok = (
        set(outputs.identities) == expected.accepted
        and not outputs.repeated
        and outputs.rejected == expected.rejected
    )
    console.print(
        "[green]every event accounted for, exactly once[/green]"
        if ok
        else "[red]outputs differ from what was expected[/red]"
    )
    return ok


async def settle(engine: Engine, want: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Per-account totals from Postgres once they stop changing or match the reference (the last
    windows close after the grace and an idle pause, then the ledger writes them)."""
    deadline = time.monotonic() + timeout_s
    got = await asyncio.to_thread(account_totals, engine)
    while got != want and time.monotonic() < deadline:
        await asyncio.sleep(1)
        got = await asyncio.to_thread(account_totals, engine)
    return got


def usdc(base_units: int | Decimal) -> str:
    return f"{Decimal(base_units) / 10**6:,.2f}"


def print_money(console: Console, engine: Engine, want: dict[str, int], got: dict[str, int]) -> bool:
    rows = account_usage(engine)
    table = Table(title=f"Per account, from Postgres (the {SHOWN_ACCOUNTS} most charged of {len(rows)})")
    for column in (
        "account",
        "plan",
        "GPU hours",
        "API requests",
        "tokens",
        "storage GB-months",
        "compute h",
    ):
        table.add_column(column, justify="left" if column in {"account", "plan"} else "right")
    for column in ("charges", "charged USDC", "balance USDC"):
        table.add_column(column, justify="right")
    for r in rows[:SHOWN_ACCOUNTS]:
        table.add_row(
            r.account_id,
            r.plan or "-",
            f"{r.gpu_hours:,.2f}",
            f"{r.api_requests:,.0f}",
            f"{r.tokens:,.0f}",
            f"{r.gb_months:,.3f}",
            f"{r.compute_hours:,.1f}",
            f"{r.charges:,}",
            usdc(r.charged),
            usdc(r.balance),
        )
    table.add_row(
        "all accounts",
        "",
        f"{sum(r.gpu_hours for r in rows):,.2f}",
        f"{sum(r.api_requests for r in rows):,.0f}",
        f"{sum(r.tokens for r in rows):,.0f}",
        f"{sum(r.gb_months for r in rows):,.3f}",
        f"{sum(r.compute_hours for r in rows):,.1f}",
        f"{sum(r.charges for r in rows):,}",
        usdc(sum(r.charged for r in rows)),
        usdc(sum(r.balance for r in rows)),
    )
    console.print(table)
    credited = earnings(engine)
    providers = [(a, b) for a, b in credited if a != "platform"]
    platform = sum(b for a, b in credited if a == "platform")
    table = Table(title="Platform and providers (credits)")
    table.add_column("ledger account")
    table.add_column("USDC", justify="right")
    table.add_row("platform (GPU fees; API, products, storage, compute)", usdc(platform))
    for account, balance in providers:
        table.add_row(account, usdc(balance))
    table.add_row("all providers", usdc(sum(b for _, b in providers)))
    console.print(table)
    debits, credits, balances = ledger_check(engine)
    differ = [a for a in set(want) | set(got) if want.get(a) != got.get(a)]
    console.print(
        f"ledger: debits {usdc(debits)} = credits {usdc(credits)} USDC: {debits == credits}; "
        f"balances sum to {balances}"
    )
    if differ:
        sample = sorted(differ)[:3]
        console.print(f"[red]{len(differ)} accounts differ from the reference rating, e.g. {sample}[/red]")
    else:
        total = usdc(sum(want.values()))
        console.print(
            f"[green]every account's total ({len(want)} accounts, {total} USDC) equals the independent "
            "reference rating, to the base unit[/green]"
        )
    return not differ and debits == credits and balances == 0


def print_analytics(console: Console, engine: Engine, run: Settings, timeout_s: float = 90) -> bool:
    """A few rollups, read from ClickHouse the way every reader does while the worker runs (its
    HTTP interface), once ClickHouse agrees with Postgres on every account and day."""
    client = reader(run.clickhouse_url)
    try:
        deadline = time.monotonic() + timeout_s
        differences = reconcile(engine, client)
        while differences and time.monotonic() < deadline:
            time.sleep(1)
            differences = reconcile(engine, client)
        by_model = client.query(
            "SELECT gpu_model, toDecimal128(sum(gpu_seconds), 6) / 3600, sum(events) FROM usage_1h "
            "WHERE type = 'gpu.usage.v1' GROUP BY gpu_model ORDER BY gpu_model"
        ).result_rows
        per_hour = client.query(
            "SELECT bucket, sum(amount_base_units), sum(charges) FROM charges_1h "
            "GROUP BY bucket ORDER BY bucket"
        ).result_rows
    finally:
        client.close()
    table = Table(title="Usage by GPU model (ClickHouse, usage_1h)")
    for column in ("GPU model", "GPU hours", "heartbeats"):
        table.add_column(column, justify="left" if column == "GPU model" else "right")
    for model, hours, beats in by_model:
        table.add_row(model, f"{hours:,.2f}", f"{beats:,}")
    console.print(table)
    table = Table(title="Revenue per hour of window start (ClickHouse, charges_1h)")
    for column in ("hour (UTC)", "charges", "USDC"):
        table.add_column(column, justify="left" if column.startswith("hour") else "right")
    for bucket, amount, count in per_hour:
        table.add_row(f"{bucket:%Y-%m-%d %H:00}", f"{count:,}", usdc(amount))
    console.print(table)
    if differences:
        console.print(
            f"[red]reconcile: {len(differences)} differences with Postgres, e.g. {differences[:2]}[/red]"
        )
    else:
        console.print(
            "[green]reconcile: ClickHouse (raw charges and daily rollup) equals Postgres on every "
            "account and day[/green]"
        )
    return not differences


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(run_demo(Settings(), events=10_000, accounts=50, console=Console()))
