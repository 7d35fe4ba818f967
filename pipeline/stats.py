"""Billing statistics (records by status, revenue by service) and usage aggregations from ClickHouse.

``tally stats`` prints them; the HTTP API calls the same functions. Every query reads the daily
rollups (a period is whole UTC days), never the raw rows, so a month costs the same whatever the
traffic: ~30 rows per account and dimension. The statistics' vocabulary, as Tally bills:
- status: ``completed`` (a window's first charge), ``adjusted`` (a later revision: late usage),
  ``failed`` (usage that could not be billed: dead letters, by reason);
- service: ``gpu_rental``, ``storage``, ``compute``, ``model_inference`` (per-product charges),
  ``api_gateway`` (tiers); usage events of API requests carry their own ``service_type``;
- billing method: ``subscription_fee`` (a tier's monthly fee), ``subscription_included`` (usage
  inside an included quota, charged 0), ``wallet_deduction`` (the rest, from the prepaid balance).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from clickhouse_connect.driver.client import Client

SECONDS_PER_HOUR = 3_600
SECONDS_PER_MONTH = 730 * SECONDS_PER_HOUR  # docs/PRICING.md: a month is 730 hours


@dataclass(frozen=True, slots=True)
class Money:
    base_units: int
    decimals: int

    @property
    def amount(self) -> Decimal:
        return Decimal(self.base_units).scaleb(-self.decimals)

    def as_json(self) -> dict[str, str | int]:
        return {"amount": str(self.amount), "base_units": self.base_units}


@dataclass(frozen=True, slots=True)
class BillingStats:
    """The billing statistics for the period ``since``..``until`` (UTC days, inclusive)."""

    since: date
    until: date
    records_by_status: dict[str, int]
    failed_by_reason: dict[str, int]
    total_revenue: Money
    revenue_by_service: dict[str, Money]
    revenue_by_method: dict[str, Money]
    charges_by_service_and_method: dict[str, dict[str, int]]
    active_accounts: int
    active_providers: int

    @property
    def total_records(self) -> int:
        return sum(self.records_by_status.values())

    def as_json(self) -> dict[str, object]:
        return {
            "stats_period_start": self.since.isoformat(),
            "stats_period_end": self.until.isoformat(),
            "total_billing_records": self.total_records,
            **{f"{status}_billing_records": count for status, count in self.records_by_status.items()},
            "failed_by_reason": self.failed_by_reason,
            "total_revenue": self.total_revenue.as_json(),
            "revenue_by_service": {k: v.as_json() for k, v in self.revenue_by_service.items()},
            "revenue_by_method": {k: v.as_json() for k, v in self.revenue_by_method.items()},
            "charges_by_service_and_method": self.charges_by_service_and_method,
            "active_accounts": self.active_accounts,
            "active_providers": self.active_providers,
        }


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    """One account's usage of one service over a period (a usage aggregation)."""

    account: str
    service: str
    events: int
    requests: int
    tokens: int
    gpu_hours: Decimal
    gb_months: Decimal
    charges: int
    charged: Money


# The period, whole UTC days from ``since`` to ``until`` included, on a rollup's bucket.
IN_PERIOD = "bucket >= {since:Date} AND bucket < {until:Date} + 1"
STATUS_SQL = f"SELECT sum(charges), sum(adjustments) FROM charges_1d WHERE {IN_PERIOD}"
FAILED_SQL = (
    f"SELECT reason, sum(rejections) FROM rejections_1m WHERE {IN_PERIOD} GROUP BY reason ORDER BY reason"
)
REVENUE_SQL = (
    "SELECT service, billing_method, sum(amount_base_units), sum(charges) FROM charges_1d "
    f"WHERE {IN_PERIOD} GROUP BY service, billing_method ORDER BY service, billing_method"
)
ACTIVE_SQL = (
    f"SELECT (SELECT uniqExact(account) FROM usage_accounts_1d WHERE {IN_PERIOD}), "
    f"(SELECT uniqExactIf(provider_id, provider_id != '') FROM usage_1d WHERE {IN_PERIOD})"
)
ONE_ACCOUNT_AND_SERVICE = (
    f"{IN_PERIOD} AND ({{account:String}} = '' OR account = {{account:String}}) "
    "AND ({service:String} = '' OR service = {service:String})"
)
USAGE_SQL = (
    "SELECT account, service, sum(events), sum(requests), sum(tokens), sum(gpu_seconds), sum(gb_seconds) "
    f"FROM usage_accounts_1d WHERE {ONE_ACCOUNT_AND_SERVICE} GROUP BY account, service"
)
CHARGED_SQL = (
    "SELECT account, service, sum(charges), sum(amount_base_units) FROM charges_accounts_1d "
    f"WHERE {ONE_ACCOUNT_AND_SERVICE} GROUP BY account, service"
)


def billing_stats(client: Client, since: date, until: date, decimals: int = 6) -> BillingStats:
    bounds = {"since": since, "until": until}
    charges, adjustments = client.query(STATUS_SQL, parameters=bounds).result_rows[0]
    records = {"completed": int(charges) - int(adjustments), "adjusted": int(adjustments)}
    failed = client.query(FAILED_SQL, parameters=bounds).result_rows
    failed_by_reason = {reason: int(count) for reason, count in failed}
    records["failed"] = sum(failed_by_reason.values())
    revenue_by_service: dict[str, int] = {}
    revenue_by_method: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for service, method, amount, count in client.query(REVENUE_SQL, parameters=bounds).result_rows:
        revenue_by_service[service] = revenue_by_service.get(service, 0) + int(amount)
        revenue_by_method[method] = revenue_by_method.get(method, 0) + int(amount)
        counts.setdefault(service, {})[method] = int(count)
    accounts, providers = client.query(ACTIVE_SQL, parameters=bounds).result_rows[0]
    return BillingStats(
        since=since,
        until=until,
        records_by_status=records,
        failed_by_reason=failed_by_reason,
        total_revenue=Money(sum(revenue_by_service.values()), decimals),
        revenue_by_service={k: Money(v, decimals) for k, v in revenue_by_service.items()},
        revenue_by_method={k: Money(v, decimals) for k, v in revenue_by_method.items()},
        charges_by_service_and_method=counts,
        active_accounts=int(accounts),
        active_providers=int(providers),
    )


def usage_aggregations(
    client: Client,
    since: date,
    until: date,
    *,
    account: str | None = None,
    service: str | None = None,
    decimals: int = 6,
) -> list[UsageAggregate]:
    """Usage and charges per (account, service) over the period, optionally for one account and
    one service; the most charged first. API usage counts under the request's ``service_type``
    while API charges are per tier (``api_gateway``) or product (``model_inference``), so an
    account's API usage and its API charges can sit on different rows."""
    bounds = {"since": since, "until": until, "account": account or "", "service": service or ""}
    usage = client.query(USAGE_SQL, parameters=bounds).result_rows
    charged = client.query(CHARGED_SQL, parameters=bounds).result_rows
    money = {(a, s): (int(n), int(amount)) for a, s, n, amount in charged}
    rows = []
    for a, s, events, requests, tokens, gpu_seconds, gb_seconds in usage:
        n, amount = money.pop((a, s), (0, 0))
        rows.append(
            UsageAggregate(
                a,
                s,
                int(events),
                int(requests),
                int(tokens),
                Decimal(int(gpu_seconds)) / SECONDS_PER_HOUR,
                Decimal(gb_seconds) / SECONDS_PER_MONTH,
                n,
                Money(amount, decimals),
            )
        )
    # Charged without usage in the period (a tier's fee, an adjustment of earlier usage).
    for (a, s), (n, amount) in money.items():
        rows.append(UsageAggregate(a, s, 0, 0, 0, Decimal(0), Decimal(0), n, Money(amount, decimals)))
    return sorted(rows, key=lambda r: (-r.charged.base_units, r.account, r.service))
