"""``tally reconcile``: ClickHouse's charges against Postgres' ledger, per account and UTC day.

Postgres is the book of record (charges, double entries, balances); ClickHouse holds the same
charges for analytics, written by another consumer of the same topic. Both must hold exactly the
same money: a difference means a lost or doubled insert on one side. Two ClickHouse sources are
compared, so a rollup that drifted from its raw table shows too:
- ``charges``: the raw table, one row per charge;
- ``charges_accounts_1d``: the daily rollup per account (through two materialized views), which
  the top-accounts panel and the per-account stats read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine

from sinks.postgres import daily_charge_totals

# Per source: (account, day, base units, charges). The rollup's ``charges`` column counts charges.
CLICKHOUSE_SOURCES = {
    "charges": "SELECT account, toDate(window_start) AS day, sum(amount_base_units), count() FROM charges "
    "WHERE toDate(window_start) BETWEEN {since:Date} AND {until:Date} GROUP BY account, day",
    "charges_accounts_1d": "SELECT account, toDate(bucket) AS day, sum(amount_base_units), sum(charges) "
    "FROM charges_accounts_1d WHERE toDate(bucket) BETWEEN {since:Date} AND {until:Date} "
    "GROUP BY account, day",
}
# No bound given: every day a Date holds.
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(2149, 6, 6)


@dataclass(frozen=True, slots=True)
class Difference:
    source: str  # the ClickHouse table compared
    account: str
    day: date
    postgres_base_units: int
    clickhouse_base_units: int
    postgres_charges: int
    clickhouse_charges: int


def clickhouse_daily_totals(
    client: Client, source: str, since: date | None = None, until: date | None = None
) -> dict[tuple[str, date], tuple[int, int]]:
    bounds = {"since": since or FIRST_DAY, "until": until or LAST_DAY}
    result = client.query(CLICKHOUSE_SOURCES[source], parameters=bounds)
    return {(account, day): (int(total), int(count)) for account, day, total, count in result.result_rows}


def reconcile(
    engine: Engine, client: Client, since: date | None = None, until: date | None = None
) -> list[Difference]:
    """Every (source, account, day) whose base units or charge count differ, in order."""
    postgres = daily_charge_totals(engine, since, until)
    differences = []
    for source in CLICKHOUSE_SOURCES:
        clickhouse = clickhouse_daily_totals(client, source, since, until)
        for key in sorted(set(postgres) | set(clickhouse)):
            pg_total, pg_count = postgres.get(key, (0, 0))
            ch_total, ch_count = clickhouse.get(key, (0, 0))
            if (pg_total, pg_count) != (ch_total, ch_count):
                differences.append(Difference(source, key[0], key[1], pg_total, ch_total, pg_count, ch_count))
    return differences
