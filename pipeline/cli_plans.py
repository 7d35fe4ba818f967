"""``tally plans``: which plan an account is on, and from when (docs/PRICING.md, "Plans and
price-book versions apply by event time")."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli_support import console, settings_or_exit

plans_app = typer.Typer(help="Account plans and their history.", no_args_is_help=True)


def _moment(text: str | None) -> datetime:
    """An ISO 8601 time with its offset (default: now), as a whole UTC second."""
    if text is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time", param_hint="--from") from None
    if moment.tzinfo is None:
        raise typer.BadParameter("give a UTC offset (Z or +hh:mm)", param_hint="--from")
    if moment.microsecond:
        raise typer.BadParameter("a plan changes on a whole second", param_hint="--from")
    return moment.astimezone(UTC)


@plans_app.command("change")
def change(
    account: Annotated[str, typer.Argument(help="The account id.")],
    plan: Annotated[str, typer.Argument(help="The plan's name, or 'none' for no plan.")],
    effective_from: Annotated[
        str | None, typer.Option("--from", help="When it takes effect (ISO 8601 with offset; now).")
    ] = None,
    actor: Annotated[str, typer.Option(help="Who makes the change (the audit log's actor).")] = "operator",
) -> None:
    """Move an account to a plan from a moment on. Usage before it keeps its plan; usage after it,
    even already metered in an open window, is rated by the new one (windows are cut at it)."""
    from sqlalchemy import create_engine, select

    from sinks.postgres import change_plan, plans_table, sqlalchemy_url

    settings = settings_or_exit()
    moment = _moment(effective_from)
    engine = create_engine(sqlalchemy_url(settings))
    try:
        name = None if plan == "none" else plan
        if name is not None:
            with engine.connect() as db:
                if db.execute(select(plans_table.c.name).where(plans_table.c.name == name)).first() is None:
                    raise typer.BadParameter(f"no plan named {name!r}", param_hint="PLAN")
        change_plan(engine, account, name, moment, actor)
    finally:
        engine.dispose()
    console.print(f"{account}: plan {plan} from {moment.isoformat()}")


@plans_app.command("show")
def show(
    account: Annotated[str, typer.Argument(help="The account id.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """An account's plan history: each plan and from when (the first since ever)."""
    from sqlalchemy import create_engine

    from sinks.postgres import plan_histories, sqlalchemy_url

    settings = settings_or_exit()
    engine = create_engine(sqlalchemy_url(settings))
    try:
        history = plan_histories(engine).get(account, [])
    finally:
        engine.dispose()
    rows = [
        {
            "from": row.effective_from.isoformat() if row.effective_from else None,
            "plan": row.plan,
            "price_book": row.price_book,
            "api_tier": row.api_tier,
            "compute_user_type": row.compute_user_type,
        }
        for row in history
    ]
    if as_json:
        typer.echo(json.dumps({"account": account, "history": rows}))
        return
    table = Table("from", "plan", "price book", "API tier", "compute user type", title=account)
    for row in rows:
        table.add_row(*(str(row[k] or ("since ever" if k == "from" else "-")) for k in row))
    Console().print(table)
