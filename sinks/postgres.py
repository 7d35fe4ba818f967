"""Postgres: migrations and the ledger writer (SQLAlchemy 2 Core over psycopg 3).

``LedgerWriter.write`` stores a batch of charges in ONE transaction, in this order:
1. insert the charges with ``ON CONFLICT (charge_id) DO NOTHING RETURNING charge_id`` (one
   multi-row statement): the ids that come back are the charges this call is the first to store;
2. insert the double-entry ledger entries of those charges only (one multi-row statement):
   customer debit = provider credit + platform credit, so debits equal credits per charge;
3. add each ledger account's net change to its balance (one upsert per batch);
4. commit. A replayed batch finds every charge id present at step 1 and changes nothing, so the
   writer is idempotent on charge_id, whatever crashed and retried.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    create_engine,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, insert

from pipeline.settings import Settings
from schemas.charges import Charge

MIGRATIONS = Path(__file__).resolve().parent.parent / "schemas" / "migrations"

metadata = MetaData()
charges_table = Table(
    "charges",
    metadata,
    Column("charge_id", UUID(as_uuid=True), primary_key=True),
    Column("account_id", Text),
    Column("meter", Text),
    Column("dimensions", JSONB),
    Column("window_start", DateTime(timezone=True)),
    Column("revision", Integer),
    Column("quantity", Numeric),
    Column("unit", Text),
    Column("unit_price", Numeric),
    Column("amount_base_units", BigInteger),
    Column("price_version", Text),
    Column("provider_id", Text),
    Column("platform_fee_base_units", BigInteger),
    Column("rated_at", DateTime(timezone=True)),
)
plans_table = Table(
    "plans",
    metadata,
    Column("name", Text, primary_key=True),
    Column("price_book", Text),
    Column("api_tier", Text),
    Column("description", Text),
)
accounts_table = Table(
    "accounts",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("plan", Text),
    Column("low_balance_threshold", BigInteger),
)
ledger_table = Table(
    "ledger_entries",
    metadata,
    Column("charge_id", UUID(as_uuid=True)),
    Column("ledger_account", Text),
    Column("side", Text),
    Column("amount_base_units", BigInteger),
)
balances_table = Table(
    "balances",
    metadata,
    Column("ledger_account", Text, primary_key=True),
    Column("balance_base_units", BigInteger),
)
PLATFORM = "platform"


def sqlalchemy_url(settings: Settings) -> str:
    """The settings' Postgres URL with SQLAlchemy's psycopg 3 driver named."""
    parts = urlsplit(settings.postgres_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def upgrade(settings: Settings) -> None:
    """Apply every Postgres migration (``tally db upgrade``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(settings).replace("%", "%%"))
    command.upgrade(config, "head")


def ledger_entries(charge: Charge) -> list[dict[str, Any]]:
    """The double-entry rows of one charge: the customer's debit, balanced by credits."""
    if charge.amount_base_units == 0:
        return []
    rows = [_entry(charge, f"customer:{charge.account}", "debit", charge.amount_base_units)]
    if charge.provider_id is not None:
        earnings = charge.amount_base_units - charge.platform_fee_base_units
        if earnings:
            rows.append(_entry(charge, f"provider:{charge.provider_id}", "credit", earnings))
        if charge.platform_fee_base_units:
            rows.append(_entry(charge, PLATFORM, "credit", charge.platform_fee_base_units))
    else:
        rows.append(_entry(charge, PLATFORM, "credit", charge.amount_base_units))
    return rows


# Postgres takes at most 65,535 bind parameters per statement: a multi-row insert carries at most
# this many values, so a batch of N rows x C columns goes as ceil(N x C / 60,000) statements.
MAX_PARAMETERS = 60_000


def _chunks(rows: list[dict[str, Any]], columns: int) -> list[list[dict[str, Any]]]:
    per_statement = MAX_PARAMETERS // columns
    return [rows[i : i + per_statement] for i in range(0, len(rows), per_statement)]


def _entry(charge: Charge, account: str, side: str, amount: int) -> dict[str, Any]:
    return {
        "charge_id": charge.charge_id,
        "ledger_account": account,
        "side": side,
        "amount_base_units": amount,
    }


class LedgerWriter:
    def __init__(self, settings: Settings) -> None:
        self.engine: Engine = create_engine(sqlalchemy_url(settings), pool_size=2, max_overflow=0)

    def write(self, charges: Sequence[Charge]) -> int:
        """Store ``charges`` with their ledger entries and balance changes, idempotently (see the
        module's steps); return how many were new."""
        if not charges:
            return 0
        by_id = {c.charge_id: c for c in charges}
        with self.engine.begin() as connection:
            rows = [
                {
                    "charge_id": c.charge_id,
                    "account_id": c.account,
                    "meter": c.meter,
                    "dimensions": c.dimensions,
                    "window_start": c.window_start,
                    "revision": c.revision,
                    "quantity": c.quantity,
                    "unit": c.unit,
                    "unit_price": c.unit_price,
                    "amount_base_units": c.amount_base_units,
                    "price_version": c.price_version,
                    "provider_id": c.provider_id,
                    "platform_fee_base_units": c.platform_fee_base_units,
                    "rated_at": c.rated_at,
                }
                for c in by_id.values()
            ]
            new: list[Charge] = []
            for chunk in _chunks(rows, len(charges_table.columns)):  # step 1
                statement = (
                    insert(charges_table)
                    .values(chunk)
                    .on_conflict_do_nothing()
                    .returning(charges_table.c.charge_id)
                )
                new += [by_id[row.charge_id] for row in connection.execute(statement)]
            entries = [entry for charge in new for entry in ledger_entries(charge)]
            if entries:
                for chunk in _chunks(entries, len(ledger_table.columns)):  # step 2
                    connection.execute(insert(ledger_table).values(chunk))
                deltas: dict[str, int] = defaultdict(int)
                for entry in entries:
                    sign = -1 if entry["side"] == "debit" else 1
                    deltas[entry["ledger_account"]] += sign * entry["amount_base_units"]
                upsert = insert(balances_table).values(
                    [{"ledger_account": a, "balance_base_units": d} for a, d in sorted(deltas.items())]
                )
                connection.execute(  # step 3; sorted keys: concurrent writers lock rows in one order
                    upsert.on_conflict_do_update(
                        index_elements=[balances_table.c.ledger_account],
                        set_={
                            "balance_base_units": balances_table.c.balance_base_units
                            + upsert.excluded.balance_base_units
                        },
                    )
                )
        return len(new)  # step 4 happened when the ``begin`` block closed

    def close(self) -> None:
        self.engine.dispose()


# Plans and accounts -------------------------------------------------------------------------------


def account_plans(engine: Engine) -> dict[str, tuple[str, str | None]]:
    """account id -> (price book name, API tier) for every account that has a plan."""
    statement = select(accounts_table.c.account_id, plans_table.c.price_book, plans_table.c.api_tier).join(
        plans_table, plans_table.c.name == accounts_table.c.plan
    )
    with engine.connect() as connection:
        return {row.account_id: (row.price_book, row.api_tier) for row in connection.execute(statement)}


def upsert_plans(engine: Engine, plans: Sequence[dict[str, Any]]) -> None:
    """Create or update plans: dicts of name, price_book, api_tier (optional), description."""
    if not plans:
        return
    rows = [{"api_tier": None, "description": "", **plan} for plan in plans]
    statement = insert(plans_table).values(rows)
    with engine.begin() as connection:
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[plans_table.c.name],
                set_={c: statement.excluded[c] for c in ("price_book", "api_tier", "description")},
            )
        )


def upsert_accounts(engine: Engine, accounts: Sequence[tuple[str, str | None]]) -> None:
    """Create accounts, or move them to another plan: (account id, plan name or None)."""
    for chunk in range(0, len(accounts), MAX_PARAMETERS // 2):
        rows = [{"account_id": a, "plan": p} for a, p in accounts[chunk : chunk + MAX_PARAMETERS // 2]]
        statement = insert(accounts_table).values(rows)
        with engine.begin() as connection:
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[accounts_table.c.account_id], set_={"plan": statement.excluded.plan}
                )
            )


# Reading the ledger back (demo, tests, benches) ---------------------------------------------------


def account_totals(engine: Engine) -> dict[str, int]:
    """Per account, the base units charged (every revision); accounts charged nothing left out."""
    statement = text("SELECT account_id, sum(amount_base_units)::bigint FROM charges GROUP BY 1")
    with engine.connect() as connection:
        return {account: int(total) for account, total in connection.execute(statement) if total}


def ledger_check(engine: Engine) -> tuple[int, int, int]:
    """(sum of debits, sum of credits, sum of every balance): double entry means d == c, sum 0."""
    statement = text(
        "SELECT (SELECT coalesce(sum(amount_base_units), 0) FROM ledger_entries WHERE side = 'debit'),"
        " (SELECT coalesce(sum(amount_base_units), 0) FROM ledger_entries WHERE side = 'credit'),"
        " (SELECT coalesce(sum(balance_base_units), 0) FROM balances)"
    )
    with engine.connect() as connection:
        debits, credits, balances = connection.execute(statement).one()
    return int(debits), int(credits), int(balances)


def account_usage(engine: Engine) -> list[Any]:
    """Per account: plan, usage per kind of meter, charges, amount charged and balance, most
    charged first."""
    statement = text("""
        SELECT c.account_id, a.plan,
               coalesce(sum(c.quantity) FILTER (WHERE c.meter = 'gpu'), 0) AS gpu_hours,
               coalesce(sum(c.quantity) FILTER (WHERE c.meter = 'api_overage'), 0) AS api_requests,
               coalesce(sum(c.quantity) FILTER (WHERE c.meter LIKE 'product:%'), 0) AS tokens,
               coalesce(sum(c.quantity) FILTER (WHERE c.meter LIKE 'storage:%'), 0) AS gb_months,
               count(*) AS charges,
               sum(c.amount_base_units)::bigint AS charged,
               coalesce(b.balance_base_units, 0) AS balance
        FROM charges c
        LEFT JOIN accounts a ON a.account_id = c.account_id
        LEFT JOIN balances b ON b.ledger_account = 'customer:' || c.account_id
        GROUP BY c.account_id, a.plan, b.balance_base_units
        ORDER BY charged DESC, c.account_id
    """)
    with engine.connect() as connection:
        return list(connection.execute(statement))


def earnings(engine: Engine) -> list[tuple[str, int]]:
    """Balances of the platform and of every provider (their credits: fees and earnings)."""
    statement = text(
        "SELECT ledger_account, balance_base_units FROM balances"
        " WHERE ledger_account = :platform OR ledger_account LIKE 'provider:%' ORDER BY 1"
    )
    with engine.connect() as connection:
        return [(a, int(b)) for a, b in connection.execute(statement, {"platform": PLATFORM})]
