"""``tally``: the command line. Each command is a thin wrapper; the work lives in the modules named."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli_analytics import clickhouse_app, reconcile, stats_app
from pipeline.cli_plans import plans_app
from pipeline.cli_support import console, settings_or_exit

app = typer.Typer(
    help="Tally: streaming metering, rating and settlement for GPU and API usage.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Show or check the settings (TALLY_* environment variables).")
topics_app = typer.Typer(help="Kafka topics Tally uses.", no_args_is_help=True)
db_app = typer.Typer(help="Databases: schema migrations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")
app.add_typer(clickhouse_app, name="clickhouse")
app.add_typer(stats_app, name="stats")
app.add_typer(plans_app, name="plans")


@config_app.callback(invoke_without_command=True)
def config(
    check: Annotated[
        bool, typer.Option("--check", help="Only validate; exit 2 listing every problem.")
    ] = False,
) -> None:
    """Print the effective settings (passwords masked), or check them."""
    settings = settings_or_exit()
    if check:
        console.print("settings OK")
        return
    typer.echo(json.dumps(settings.redacted(), indent=2, default=str))


@topics_app.command("create")
def topics_create() -> None:
    """Create the topics Tally declares (idempotent)."""
    from pipeline.topics import create_topics, declared_topics

    settings = settings_or_exit()
    results = asyncio.run(create_topics(settings))
    purposes = {t.name: t.purpose for t in declared_topics(settings)}
    for name, status in results:
        typer.echo(f"{name:40s} {status:8s} {settings.partitions} partitions  {purposes[name]}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Postgres migrations and the ClickHouse DDL (both idempotent)."""
    from pipeline.settings import mask_url
    from sinks.clickhouse import PathLockedError, connect, migrate
    from sinks.postgres import upgrade

    settings = settings_or_exit()
    upgrade(settings)
    console.print(f"postgres schema up to date at {mask_url(settings.postgres_url)}")
    try:
        client = connect(settings.clickhouse_url)
    except PathLockedError as exc:
        # The running worker owns the path, and applies the same DDL when it takes it.
        console.print(f"clickhouse: {exc}; its worker applies the DDL on start")
        return
    try:
        applied = migrate(client)
    finally:
        client.close()
    console.print(
        f"clickhouse schema up to date at {mask_url(settings.clickhouse_url)} (applied: {applied or 'none'})"
    )


@app.command()
def worker(loglevel: Annotated[str, typer.Option(help="Log level.")] = "info") -> None:
    """Run a worker: the Faust app with its stages (meter, ledger, analytics; TALLY_STAGES)."""
    import faust

    from pipeline.app import create_app

    settings = settings_or_exit()
    faust_app = create_app(settings)
    # The hot path allocates ~10 container objects per event (tuples, structs, lists) and frees
    # them within a poll; with the default gen-0 threshold (700) the cyclic collector ran every
    # ~70 events and rescanned everything imported. Freeze what start-up made (never collected)
    # and collect young objects every 50,000 allocations instead. bench/meter batch, median of 3:
    # 47,320 -> 50,295 events/s (within this machine's run-to-run spread, so a small gain at most).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    faust.Worker(faust_app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


@app.command()
def produce(
    file: Annotated[Path | None, typer.Argument(help="JSON lines file; stdin when omitted.")] = None,
) -> None:
    """Publish events, one JSON CloudEvent (or CloudEvents batch) per line, to usage.raw.

    Valid events are batched per account and keyed by it; a line that is not a valid event is still
    published as it is, so ingest dead-letters it with a reason instead of it being lost here.
    """
    from pipeline.producer import TallyProducer
    from schemas.events import event_decoder

    settings = settings_or_exit()
    lines = (file.open("rb") if file else sys.stdin.buffer).read().splitlines()

    async def run() -> tuple[int, int]:
        valid = []
        raw: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                valid.append(event_decoder.decode(line))
            except Exception:  # anything not decodable goes to ingest verbatim, which says why
                raw.append((None, line))
        async with TallyProducer(settings) as producer:
            messages = await producer.send_events(valid)
            await producer.send_raw(raw)
        return len(valid) + len(raw), messages + len(raw)

    events, messages = asyncio.run(run())
    console.print(f"published {events} lines in {messages} messages to {settings.topic_raw}")


@app.command()
def loadgen(
    events: Annotated[int, typer.Option(help="Events to generate.")] = 100_000,
    accounts: Annotated[int, typer.Option(help="Distinct accounts.")] = 100,
    rate: Annotated[float, typer.Option(help="Events/s; 0 = as fast as possible.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Events per message; 1 = single-event messages.")] = 1,
    duplicates: Annotated[float, typer.Option(help="Fraction of exact repeats.")] = 0.05,
    bad: Annotated[float, typer.Option(help="Fraction of bad input (every kind in turn).")] = 0.05,
    seed: Annotated[int, typer.Option(help="RNG seed.")] = 0,
    manifest: Annotated[Path | None, typer.Option(help="Write the expected outcome here as JSON.")] = None,
    accounts_file: Annotated[Path | None, typer.Option(help="Write the generated account ids here.")] = None,
) -> None:
    """Publish realistic synthetic GPU / API / storage usage, with duplicates and bad input."""
    from pipeline.loadgen import BadKind, Expected, LoadPlan, account_ids, default_now, generate, publish

    settings = settings_or_exit()
    if accounts_file is not None:
        accounts_file.write_text("\n".join(account_ids(accounts)) + "\n", encoding="utf-8")
    kinds = tuple(k for k in BadKind if k is not BadKind.UNKNOWN_ACCOUNT or settings.accounts_file)
    plan = LoadPlan(
        events=events,
        accounts=accounts,
        duplicate_fraction=duplicates,
        bad_fraction=bad,
        batch_size=batch_size,
        bad_kinds=kinds,
        seed=seed,
        max_event_bytes=settings.max_event_bytes,
        max_message_bytes=settings.max_message_bytes,
    )
    expected = Expected()
    with Progress(
        TextColumn("loadgen"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("events", total=events)
        sent, seconds = asyncio.run(
            publish(
                settings,
                generate(plan, default_now(), expected),
                rate=rate,
                on_progress=lambda n: progress.advance(bar, n),
            )
        )
    summary = {
        "events": expected.events,
        "messages": expected.messages,
        "accepted": len(expected.accepted),
        "duplicates": expected.duplicates,
        "rejected": dict(sorted(expected.rejected.items())),
        "seconds": round(seconds, 3),
        "events_per_s": round(sent / seconds) if seconds else None,
    }
    if manifest is not None:
        manifest.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    typer.echo(json.dumps(summary))


DEFAULT_PRICE_BOOK = Path(__file__).resolve().parent.parent / "schemas" / "pricebooks" / "default.yaml"


@app.command()
def quote(
    price_book: Annotated[Path, typer.Option(help="Price book YAML.")] = DEFAULT_PRICE_BOOK,
    plan: Annotated[
        str | None,
        typer.Option(help="Plan of subjects no line gives one: an API tier and/or compute user type."),
    ] = None,
) -> None:
    """Rate usage events read as JSON lines on stdin, as the meter would; print each charge line
    as JSON, then the run's total.

    Each line is a CloudEvent (specversion, id and source may be left out) with an optional
    "plan": the subject's plan from that event on. The events go through the meter's own steps
    (ingest's checks, dedupe, windows, sessions, period-exact rating); every window is closed
    and every GPU session ended at the end. No Kafka, no database. A line ingest or the meter
    rejects is reported with its reason; the others still run.
    """
    from pipeline.quote import quote as rate_quote
    from schemas.pricebook import PriceBookError, load_price_book

    try:
        book = load_price_book(price_book)
    except (OSError, PriceBookError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    settings = settings_or_exit()
    try:
        result = rate_quote(sys.stdin.buffer, book, settings, plan)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    decimals = book.token.decimals
    for error in result.errors:
        typer.echo(json.dumps({"line": error.line, "error": error.reason, "detail": error.detail}))
    charges = sorted(result.charges, key=lambda c: (c.account, c.window_start, c.meter, c.revision))
    for c in charges:
        line = {
            "account": c.account,
            "meter": c.meter,
            "dimensions": c.dimensions,
            "window_start": c.window_start.isoformat(),
            "revision": c.revision,
            "quantity": c.quantity,
            "unit": c.unit,
            "unit_price": c.unit_price,
            "amount": _decimal_text(c.amount_base_units, decimals),
            "amount_base_units": c.amount_base_units,
            "price_version": c.price_version,
        }
        if c.provider_id is not None:
            line |= {
                "provider_id": c.provider_id,
                "platform_fee_base_units": c.platform_fee_base_units,
                "provider_earnings_base_units": c.amount_base_units - c.platform_fee_base_units,
            }
        typer.echo(json.dumps(line))
    total = sum(c.amount_base_units for c in charges)
    by_account: dict[str, int] = {}
    for c in charges:
        by_account[c.account] = by_account.get(c.account, 0) + c.amount_base_units
    summary = {
        "total": _decimal_text(total, decimals),
        "total_base_units": total,
        "token": book.token.symbol,
        "events": result.events,
        "charges": len(charges),
        "errors": len(result.errors),
        "accounts": dict(sorted(by_account.items())),
    }
    typer.echo(json.dumps(summary))


def _decimal_text(base_units: int, decimals: int) -> str:
    from decimal import Decimal

    return str(Decimal(base_units).scaleb(-decimals))


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Events to publish.")] = 100_000,
    accounts: Annotated[int, typer.Option(help="Distinct accounts.")] = 200,
) -> None:
    """Run a worker, publish synthetic usage with duplicates and bad input, report what came out
    and the money: per-account usage, charges and balances, platform and provider totals."""
    from pipeline.demo import run_demo

    # The report's tables are 120 columns wide: under `make` (not a terminal) rich would assume 80.
    wide = console if console.is_terminal else Console(stderr=True, width=140)
    raise typer.Exit(
        asyncio.run(run_demo(settings_or_exit(), events=events, accounts=accounts, console=wide))
    )


app.command()(reconcile)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Client chatter (group joins, metadata) is for worker logs, not for a command's output.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app()


if __name__ == "__main__":  # `python -m pipeline.cli`, as test harnesses start a command
    main()
