"""``tally stats``, ``tally reconcile``, ``tally clickhouse serve``: the analytics commands."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from datetime import date
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli_support import console, settings_or_exit

clickhouse_app = typer.Typer(help="The analytics engine (ClickHouse).", no_args_is_help=True)
stats_app = typer.Typer(help="Billing statistics and usage aggregations (ClickHouse rollups).")


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

    settings = settings_or_exit()
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


def _days(since: str | None, until: str | None) -> tuple[date | None, date | None]:
    """``--since``/``--until`` as UTC days (None where not given); exit 2 on a bad one."""
    try:
        first = date.fromisoformat(since) if since else None
        last = date.fromisoformat(until) if until else None
    except ValueError as exc:
        console.print(f"[red]--since/--until: {exc}[/red]")
        raise typer.Exit(2) from None
    if first is not None and last is not None and first > last:
        console.print("[red]--since is after --until[/red]")
        raise typer.Exit(2)
    return first, last


def _period(since: str | None, until: str | None) -> tuple[date, date]:
    """``--since``/``--until``; by default the last 30 days up to today."""
    from datetime import UTC, datetime, timedelta

    first, last = _days(since, until)
    last = last or datetime.now(UTC).date()
    first = first or last - timedelta(days=29)
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
    """Billing statistics for a period: records by status, revenue by service and
    billing method, active accounts and providers."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from pipeline.stats import billing_stats
    from sinks.clickhouse import reader

    first, last = _period(since, until)
    client = reader(settings_or_exit().clickhouse_url)
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
    """Usage aggregations by account and service type, with what each was charged."""
    from rich.table import Table

    from pipeline.stats import usage_aggregations
    from sinks.clickhouse import reader

    first, last = _period(since, until)
    client = reader(settings_or_exit().clickhouse_url)
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

    settings = settings_or_exit()
    first, last = _days(since, until)
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
