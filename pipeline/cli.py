"""``tally``: the command line. Each command is a thin wrapper; the work lives in the modules named."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.settings import Settings, SettingsError, load_settings

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
clickhouse_app = typer.Typer(help="The analytics engine (ClickHouse).", no_args_is_help=True)
app.add_typer(clickhouse_app, name="clickhouse")
stats_app = typer.Typer(help="Billing statistics and usage aggregations (ClickHouse rollups).")
app.add_typer(stats_app, name="stats")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@config_app.callback(invoke_without_command=True)
def config(
    check: Annotated[
        bool, typer.Option("--check", help="Only validate; exit 2 listing every problem.")
    ] = False,
) -> None:
    """Print the effective settings (passwords masked), or check them."""
    settings = _settings()
    if check:
        console.print("settings OK")
        return
    typer.echo(json.dumps(settings.redacted(), indent=2, default=str))


@topics_app.command("create")
def topics_create() -> None:
    """Create the topics Tally declares (idempotent)."""
    from pipeline.topics import create_topics, declared_topics

    settings = _settings()
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

    settings = _settings()
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


@clickhouse_app.command("serve")
def clickhouse_serve(
    port: Annotated[int, typer.Option(help="Loopback port (0: any free one, printed).")] = 8123,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    read_only: Annotated[bool, typer.Option(help="Refuse INSERT and DDL.")] = False,
) -> None:
    """Serve the embedded engine's path (TALLY_CLICKHOUSE_URL=chdb:///...) over ClickHouse's HTTP
    interface, as a stand-alone server: point a worker's TALLY_CLICKHOUSE_URL, Grafana or any
    ClickHouse client at it. Not while a worker owns the same path."""
    from sinks.clickhouse import connect
    from sinks.clickhouse_http import ClickHouseHttpServer

    settings = _settings()
    if not settings.clickhouse_url.startswith("chdb:"):
        console.print("[red]TALLY_CLICKHOUSE_URL is a server already; serve needs a chdb:/// path[/red]")
        raise typer.Exit(2)
    client = connect(settings.clickhouse_url)

    async def serve() -> None:
        server = ClickHouseHttpServer(client, host, port, read_only=read_only)
        typer.echo(f"serving {settings.clickhouse_url} at {await server.start()}", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


@app.command()
def worker(loglevel: Annotated[str, typer.Option(help="Log level.")] = "info") -> None:
    """Run a worker: the Faust app with the ingest, meter and ledger stages."""
    import faust

    from pipeline.app import create_app

    settings = _settings()
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

    settings = _settings()
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

    settings = _settings()
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
        str | None, typer.Option(help="Plan for lines without one (API tier or user type).")
    ] = None,
) -> None:
    """Rate usage read as JSON lines on stdin; print one JSON object per line, then the run's total.

    No Kafka, no database. A bad line gets an error object naming the field; the others still run.
    """
    import msgspec

    from agents.rating import QuoteSession
    from schemas.pricebook import PriceBookError, load_price_book
    from schemas.quote import quote_decoder

    try:
        book = load_price_book(price_book)
    except (OSError, PriceBookError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    session = QuoteSession(book, plan)
    decimals = book.token.decimals
    total, rated, errors = 0, 0, 0
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        if not raw.strip():
            continue
        try:
            lines = session.rate(quote_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError, LookupError) as exc:
            errors += 1
            typer.echo(json.dumps({"line": number, "error": str(exc)}))
            continue
        rated += 1
        amount = sum(c.amount_base_units for c in lines)
        total += amount
        charges = [
            {
                "meter": c.meter,
                "quantity": str(c.quantity),
                "unit": c.unit,
                "unit_price": str(c.unit_price),
                "amount": str(c.amount),
                "amount_base_units": c.amount_base_units,
                "price_version": c.price_version,
            }
            for c in lines
        ]
        typer.echo(
            json.dumps(
                {
                    "line": number,
                    "charges": charges,
                    "total": _decimal_text(amount, decimals),
                    "total_base_units": amount,
                }
            )
        )
    # Each API billing period the lines touched also pays its tier's fee once (seed 004).
    period_fees = session.period_fees()
    total += sum(fee.amount_base_units for *_, fee in period_fees)
    fees = [
        {
            "subject": subject,
            "plan": tier,
            "period": month,
            "fee": str(fee.amount),
            "fee_base_units": fee.amount_base_units,
        }
        for subject, tier, month, fee in period_fees
    ]
    summary = {
        "total": _decimal_text(total, decimals),
        "total_base_units": total,
        "token": book.token.symbol,
        "lines": rated,
        "errors": errors,
        "period_fees": fees,
    }
    typer.echo(json.dumps(summary))


def _decimal_text(base_units: int, decimals: int) -> str:
    from decimal import Decimal

    return str(Decimal(base_units).scaleb(-decimals))


def _period(since: str | None, until: str | None) -> tuple[date, date]:
    """``--since``/``--until`` as UTC days; by default the last 30 days up to today."""
    from datetime import UTC, datetime, timedelta

    try:
        last = date.fromisoformat(until) if until else datetime.now(UTC).date()
        first = date.fromisoformat(since) if since else last - timedelta(days=29)
    except ValueError as exc:
        console.print(f"[red]--since/--until: {exc}[/red]")
        raise typer.Exit(2) from None
    if first > last:
        console.print("[red]--since is after --until[/red]")
        raise typer.Exit(2)
    return first, last


SinceOption = Annotated[str | None, typer.Option(help="First UTC day, YYYY-MM-DD (default: 29 days back).")]
UntilOption = Annotated[str | None, typer.Option(help="Last UTC day, YYYY-MM-DD, included (default: today).")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


@stats_app.callback(invoke_without_command=True)
def stats(
    ctx: typer.Context, since: SinceOption = None, until: UntilOption = None, as_json: JsonOption = False
) -> None:
    """Billing statistics for a period (seed 003): records by status, revenue by service and
    billing method, active accounts and providers."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from pipeline.stats import billing_stats
    from sinks.clickhouse import reader

    first, last = _period(since, until)
    client = reader(_settings().clickhouse_url)
    try:
        result = billing_stats(client, first, last)
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
        return
    out = Console()
    out.print(f"billing statistics {first} .. {last} (UTC)")
    table = Table(title="records by status")
    table.add_column("status")
    table.add_column("records", justify="right")
    for status, count in result.records_by_status.items():
        table.add_row(status, f"{count:,}")
    for reason, count in result.failed_by_reason.items():
        table.add_row(f"  failed: {reason}", f"{count:,}")
    table.add_row("total", f"{result.total_records:,}")
    out.print(table)
    table = Table(title="revenue")
    for column in ("service", "billing method", "charges", "amount"):
        table.add_column(column, justify="right" if column in {"charges", "amount"} else "left")
    for service, methods in result.charges_by_service_and_method.items():
        for method, count in methods.items():
            table.add_row(service, method, f"{count:,}", "")
        table.add_row(service, "all", "", f"{result.revenue_by_service[service].amount:,}")
    for method, money in result.revenue_by_method.items():
        table.add_row("all", method, "", f"{money.amount:,}")
    table.add_row("total", "", "", f"{result.total_revenue.amount:,}")
    out.print(table)
    out.print(f"active accounts: {result.active_accounts:,}; active providers: {result.active_providers:,}")


@stats_app.command("usage")
def stats_usage(
    since: SinceOption = None,
    until: UntilOption = None,
    account: Annotated[str | None, typer.Option(help="One account only.")] = None,
    service: Annotated[str | None, typer.Option(help="One service type only.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Usage aggregations by account and service type (seed 003), with what each was charged."""
    from rich.table import Table

    from pipeline.stats import usage_aggregations
    from sinks.clickhouse import reader

    first, last = _period(since, until)
    client = reader(_settings().clickhouse_url)
    try:
        rows = usage_aggregations(client, first, last, account=account, service=service)
    finally:
        client.close()
    if as_json:
        for r in rows:
            record = {**asdict(r), "charged": r.charged.as_json()}
            typer.echo(json.dumps(record, default=str))  # Decimals as exact text
        return
    table = Table(title=f"usage by account and service, {first} .. {last} (UTC)")
    columns = (
        "account",
        "service",
        "events",
        "requests",
        "tokens",
        "GPU h",
        "GB-months",
        "charges",
        "charged",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in {"account", "service"} else "right")
    for r in rows:
        table.add_row(
            r.account,
            r.service,
            f"{r.events:,}",
            f"{r.requests:,}",
            f"{r.tokens:,}",
            f"{r.gpu_hours:,.2f}",
            f"{r.gb_months:,.3f}",
            f"{r.charges:,}",
            f"{r.charged.amount:,}",
        )
    Console().print(table)


@app.command()
def reconcile(
    since: Annotated[str | None, typer.Option(help="First UTC day (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day (YYYY-MM-DD), included.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Compare ClickHouse's charges (raw table, daily per-account rollup) with Postgres per account and day;
    list every difference; exit 1 when there is one."""
    from rich.table import Table
    from sqlalchemy import create_engine

    from pipeline.reconcile import reconcile as compare
    from sinks.clickhouse import reader
    from sinks.postgres import sqlalchemy_url

    settings = _settings()
    try:
        first = date.fromisoformat(since) if since else None
        last = date.fromisoformat(until) if until else None
    except ValueError as exc:
        console.print(f"[red]--since/--until: {exc}[/red]")
        raise typer.Exit(2) from None
    engine = create_engine(sqlalchemy_url(settings))
    client = reader(settings.clickhouse_url)
    try:
        differences = compare(engine, client, first, last)
    finally:
        client.close()
        engine.dispose()
    if as_json:
        for d in differences:
            typer.echo(json.dumps(asdict(d), default=str))  # the day as YYYY-MM-DD
    elif differences:
        table = Table(title=f"{len(differences)} differences (base units)")
        for column in ("source", "account", "day", "postgres", "clickhouse", "pg charges", "ch charges"):
            table.add_column(column)
        for d in differences:
            table.add_row(
                d.source,
                d.account,
                d.day.isoformat(),
                str(d.postgres_base_units),
                str(d.clickhouse_base_units),
                str(d.postgres_charges),
                str(d.clickhouse_charges),
            )
        Console().print(table)
    else:
        console.print("ClickHouse (charges, charges_accounts_1d) and Postgres agree on every account and day")
    raise typer.Exit(1 if differences else 0)


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
    raise typer.Exit(asyncio.run(run_demo(_settings(), events=events, accounts=accounts, console=wide)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Client chatter (group joins, metadata) is for worker logs, not for a command's output.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    app()


if __name__ == "__main__":  # `python -m pipeline.cli`, as test harnesses start a command
    main()
