"""Postgres: migrations and the ledger writer (SQLAlchemy 2 Core over psycopg 3).

``LedgerWriter.write`` stores a batch of charges in ONE transaction, in this order:
1. COPY the batch into a temporary table (psycopg's COPY: ~10x a multi-row INSERT built by
   SQLAlchemy, whose statement compilation held the GIL for ~1 ms per charge here);
2. insert them into ``charges`` with ``ON CONFLICT (charge_id) DO NOTHING RETURNING``: the rows
   that come back are the charges this call is the first to store;
3. in the same statement, insert the double-entry ledger entries of those charges only
   (customer debit = provider credit + platform credit, so debits equal credits per charge; a
   credit, a negative charge correcting its period's total, swaps every side) and add each ledger
   account's net change to its balance;
4. commit. A replayed batch finds every charge id present at step 1 and changes nothing, so the
   writer is idempotent on charge_id, whatever crashed and retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    MetaData,
    Table,
    Text,
    create_engine,
    text,
)
from sqlalchemy.dialects.postgresql import insert

from schemas.charges import Charge

MIGRATIONS = Path(__file__).resolve().parent.parent / "schemas" / "migrations"

metadata = MetaData()
plans_table = Table(
    "plans",
    metadata,
    Column("name", Text, primary_key=True),
    Column("price_book", Text),
    Column("api_tier", Text),
    Column("compute_user_type", Text),
    Column("description", Text),
)
accounts_table = Table(
    "accounts",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("plan", Text),
    Column("low_balance_threshold", BigInteger),
)
plan_changes_table = Table(
    "plan_changes",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("plan", Text),
    Column("effective_from", DateTime(timezone=True), primary_key=True),
    Column("actor", Text),
)
PLATFORM = "platform"


class PostgresSettings(Protocol):
    """What this sink reads of the worker's settings, which the wiring layer builds (the layers:
    docs/ARCHITECTURE.md): the database's URL, as libpq takes it."""

    @property
    def postgres_url(self) -> str: ...


def sqlalchemy_url(settings: PostgresSettings) -> str:
    """The settings' Postgres URL with SQLAlchemy's psycopg 3 driver named."""
    parts = urlsplit(settings.postgres_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def upgrade(settings: PostgresSettings) -> None:
    """Apply every Postgres migration (``tally db upgrade``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(settings).replace("%", "%%"))
    command.upgrade(config, "head")


# Postgres takes at most 65,535 bind parameters per statement: a multi-row insert carries at most
# this many values, so a batch of N rows x C columns goes as ceil(N x C / 60,000) statements.
MAX_PARAMETERS = 60_000

CHARGE_COLUMNS = (
    "charge_id",
    "account_id",
    "meter",
    "dimensions",
    "window_start",
    "revision",
    "quantity",
    "unit",
    "unit_price",
    "amount_base_units",
    "price_version",
    "provider_id",
    "platform_fee_base_units",
    "rated_at",
)

_json = msgspec.json.Encoder()
_INCOMING = text("CREATE TEMP TABLE incoming (LIKE charges INCLUDING DEFAULTS) ON COMMIT DROP")
# Steps 2-4 of the module docstring as one set-based statement over the COPYed batch: every row of
# ``new`` is a charge this call stored first; its entries are the customer's debit and the credits
# that balance it (provider earnings and platform fee for a provider's charge, else the platform),
# each side reversed for a negative amount; zero amounts make no entry. Balances are upserted in
# ledger-account order, so two writers lock rows in the same order and cannot deadlock.
_STORE = text(f"""
WITH new AS (
    INSERT INTO charges ({", ".join(CHARGE_COLUMNS)})
    SELECT DISTINCT ON (charge_id) {", ".join(CHARGE_COLUMNS)} FROM incoming
    ON CONFLICT (charge_id) DO NOTHING
    RETURNING charge_id, account_id, amount_base_units, provider_id, platform_fee_base_units
), entries AS (
    INSERT INTO ledger_entries (charge_id, ledger_account, side, amount_base_units)
    SELECT charge_id, ledger_account, CASE WHEN credit > 0 THEN 'credit' ELSE 'debit' END, abs(credit)
    FROM (
        SELECT charge_id, 'customer:' || account_id AS ledger_account, -amount_base_units AS credit
        FROM new
        UNION ALL
        SELECT charge_id, 'provider:' || provider_id, amount_base_units - platform_fee_base_units
        FROM new WHERE provider_id IS NOT NULL
        UNION ALL
        SELECT charge_id, :platform,
               CASE WHEN provider_id IS NULL THEN amount_base_units ELSE platform_fee_base_units END
        FROM new
    ) AS lines
    WHERE credit <> 0
    RETURNING ledger_account, side, amount_base_units
), moved AS (
    INSERT INTO balances (ledger_account, balance_base_units)
    SELECT ledger_account, sum(CASE side WHEN 'debit' THEN -amount_base_units ELSE amount_base_units END)
    FROM entries GROUP BY ledger_account ORDER BY ledger_account
    ON CONFLICT (ledger_account) DO UPDATE
    SET balance_base_units = balances.balance_base_units + EXCLUDED.balance_base_units, updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM moved)
""")  # noqa: S608  # interpolates only the constant CHARGE_COLUMNS


class LedgerWriter:
    def __init__(self, settings: PostgresSettings) -> None:
        self.engine: Engine = create_engine(sqlalchemy_url(settings), pool_size=2, max_overflow=0)

    def write(self, charges: Sequence[Charge]) -> int:
        """Store ``charges`` with their ledger entries and balance changes, idempotently (see the
        module's steps); return how many were new."""
        if not charges:
            return 0
        with self.engine.begin() as connection:
            connection.execute(_INCOMING)
            driver = connection.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with (
                driver.cursor() as cursor,
                cursor.copy(  # step 1
                    f"COPY incoming ({', '.join(CHARGE_COLUMNS)}) FROM STDIN"
                ) as copy,
            ):
                # Dimensions go as JSON text, which COPY parses into jsonb: psycopg's Jsonb wrapper
                # runs json.dumps per row, 6.9 us per row against 4.6 here, in a thread that holds
                # the worker's GIL meanwhile.
                for c in charges:
                    copy.write_row(
                        (
                            c.charge_id,
                            c.account,
                            c.meter,
                            _json.encode(c.dimensions).decode(),
                            c.window_start,
                            c.revision,
                            c.quantity,
                            c.unit,
                            c.unit_price,
                            c.amount_base_units,
                            c.price_version,
                            c.provider_id,
                            c.platform_fee_base_units,
                            c.rated_at,
                        )
                    )
            new, _ = connection.execute(_STORE, {"platform": PLATFORM}).one()  # steps 2-3
        return int(new)  # step 4 happened when the ``begin`` block closed

    def close(self) -> None:
        self.engine.dispose()


# Plans and accounts -------------------------------------------------------------------------------


class PlanRow(NamedTuple):
    """One entry of an account's plan history: from when (None: since ever), and the plan (its
    name None: no plan)."""

    effective_from: datetime | None
    plan: str | None
    price_book: str | None
    api_tier: str | None
    compute_user_type: str | None


def plan_histories(engine: Engine) -> dict[str, list[PlanRow]]:
    """account id -> its plan history in time order, for every account with a plan or a change."""
    statement = text("""
        SELECT a.account_id, NULL::timestamptz AS effective_from, a.plan, p.price_book, p.api_tier,
               p.compute_user_type
        FROM accounts a LEFT JOIN plans p ON p.name = a.plan
        UNION ALL
        SELECT c.account_id, c.effective_from, c.plan, p.price_book, p.api_tier, p.compute_user_type
        FROM plan_changes c LEFT JOIN plans p ON p.name = c.plan
        ORDER BY 1, 2 NULLS FIRST
    """)
    histories: dict[str, list[PlanRow]] = {}
    with engine.connect() as connection:
        for account, *row in connection.execute(statement):
            histories.setdefault(account, []).append(PlanRow(*row))
    return histories


def change_plan(engine: Engine, account: str, plan: str | None, effective_from: datetime, actor: str) -> None:
    """From ``effective_from`` (a whole second) on, ``account`` is on ``plan`` (None: no plan);
    the change and who made it are also in the audit log. The account is created if need be."""
    with engine.begin() as connection:
        connection.execute(
            insert(accounts_table).values(account_id=account, plan=None).on_conflict_do_nothing()
        )
        statement = insert(plan_changes_table).values(
            account_id=account, plan=plan, effective_from=effective_from, actor=actor
        )
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[plan_changes_table.c.account_id, plan_changes_table.c.effective_from],
                set_={"plan": statement.excluded.plan, "actor": statement.excluded.actor},
            )
        )
        connection.execute(
            text(
                "INSERT INTO audit_log (actor, action, subject, details) "
                "VALUES (:actor, 'plan_change', :account, CAST(:details AS jsonb))"
            ),
            {
                "actor": actor,
                "account": account,
                "details": _json.encode(
                    {"plan": plan, "effective_from": effective_from.isoformat()}
                ).decode(),
            },
        )


def upsert_plans(engine: Engine, plans: Sequence[dict[str, Any]]) -> None:
    """Create or update plans: dicts of name, price_book, and optionally api_tier,
    compute_user_type and description."""
    if not plans:
        return
    rows = [{"api_tier": None, "compute_user_type": None, "description": "", **plan} for plan in plans]
    statement = insert(plans_table).values(rows)
    with engine.begin() as connection:
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[plans_table.c.name],
                set_={
                    c: statement.excluded[c]
                    for c in ("price_book", "api_tier", "compute_user_type", "description")
                },
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


def daily_charge_totals(
    engine: Engine, since: date | None = None, until: date | None = None
) -> dict[tuple[str, date], tuple[int, int]]:
    """(account, UTC day of the window start) -> (base units, charges): what reconcile compares."""
    statement = text(
        "SELECT account_id, (window_start AT TIME ZONE 'UTC')::date AS day, "
        "sum(amount_base_units)::bigint, count(*) FROM charges "
        "WHERE (CAST(:since AS date) IS NULL OR window_start >= CAST(:since AS date)) "
        "AND (CAST(:until AS date) IS NULL OR window_start < CAST(:until AS date) + 1) GROUP BY 1, 2"
    )
    with engine.connect() as connection:
        rows = connection.execute(statement, {"since": since, "until": until})
        return {(account, day): (int(total), int(count)) for account, day, total, count in rows}


def customer_balances(engine: Engine) -> list[tuple[str, int, int]]:
    """(account, prepaid balance, low-balance threshold) of every account with a balance or a row
    in ``accounts``, in base units."""
    statement = text(
        "SELECT coalesce(a.account_id, substr(b.ledger_account, 10)), coalesce(b.balance_base_units, 0), "
        "coalesce(a.low_balance_threshold, 0) FROM accounts a "
        "FULL JOIN (SELECT * FROM balances WHERE ledger_account LIKE 'customer:%') b "
        "ON b.ledger_account = 'customer:' || a.account_id"
    )
    with engine.connect() as connection:
        return [
            (account, int(balance), int(threshold))
            for account, balance, threshold in connection.execute(statement)
        ]


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
               coalesce(sum(c.quantity) FILTER (WHERE c.meter LIKE 'compute:%'), 0) AS compute_hours,
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
