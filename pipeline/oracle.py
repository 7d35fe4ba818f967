"""An independent reference for money totals: what Postgres must hold after a run.

Shipped with Tally (as bytewax ships its testing sinks) so the exactly-once test, ``make demo``
and the meter bench check the pipeline against the same reference. It shares nothing with the
meter but the price book's numbers: it does not window, close, adjust or carry quota state. It
groups the accepted events by what a charge is for (a GPU or storage window, an API or product
billing period) and prices each group once, in exact rationals (``Fraction``), rounded half-even
to base units (the rule docs/PRICING.md states for windows and periods).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC
from decimal import Decimal
from fractions import Fraction

import msgspec
from sqlalchemy import Engine

from agents.rating import price
from pipeline.loadgen import Expected, Message
from pipeline.settings import Settings
from schemas.events import (
    ApiRequestEvent,
    GpuUsageEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    StorageUsageEvent,
    UsageEvent,
    event_decoder,
)
from schemas.pricebook import PriceBook, load_price_book
from sinks.postgres import upsert_accounts, upsert_plans

TIERS = ("startup", "growth", "enterprise")
# The user type each tier's plan prices compute sessions by (seed 002).
USER_TYPES = {"startup": "free", "growth": "pro", "enterprise": "enterprise"}


def tier_plans(accounts: list[str]) -> dict[str, str | None]:
    """A tier for three of every four accounts; the fourth has no plan (the default book)."""
    return {a: (TIERS[i % 4] if i % 4 < 3 else None) for i, a in enumerate(accounts)}


def store_plans(engine: Engine, plans: dict[str, str | None], book: str = "default") -> None:
    """One plan per API tier (named after it, with its compute user type) and every account on
    its plan, in Postgres."""
    upsert_plans(
        engine,
        [{"name": t, "price_book": book, "api_tier": t, "compute_user_type": USER_TYPES[t]} for t in TIERS],
    )
    upsert_accounts(engine, list(plans.items()))


def accepted_events(messages: list[Message], expected: Expected) -> list[UsageEvent]:
    """The first copy of every event the pipeline must accept, decoded from the produced bytes."""
    seen: set[tuple[str, str]] = set()
    events: list[UsageEvent] = []
    for message in messages:
        try:
            raw = msgspec.json.decode(message.value)
        except msgspec.DecodeError:
            continue
        for item in raw if isinstance(raw, list) else [raw]:
            if not isinstance(item, dict):
                continue
            identity = (item.get("source"), item.get("id"))
            if identity in expected.accepted and identity not in seen:
                seen.add(identity)
                events.append(event_decoder.decode(msgspec.json.encode(item)))
    assert len(events) == len(expected.accepted)
    return events


def oracle(settings: Settings, events: list[UsageEvent], plans: dict[str, str | None]) -> dict[str, int]:
    """Per account, the base units Postgres must hold for ``events`` (every account on the
    default book, with the API tier ``plans`` gives it and that tier's compute user type)."""
    book = load_price_book(settings.price_books_dir / f"{settings.default_price_book}.yaml")
    unit = Fraction(10) ** book.token.decimals
    windows: dict[tuple[str, str, str, int], Fraction] = defaultdict(Fraction)
    periods: dict[tuple[str, str, str], Fraction] = defaultdict(Fraction)
    for e in events:
        version = book.version_at(e.time)
        minute = int(e.time.timestamp()) // 60
        month = e.time.astimezone(UTC).strftime("%Y-%m")
        if isinstance(e, GpuUsageEvent):
            g = e.data
            rates = version.gpu
            assert rates is not None
            hourly = Fraction(rates.base_rate_per_hour[g.gpu_model]) * Fraction(
                g.vram_allocated_gb
            ) / Fraction(g.vram_total_gb) + Fraction(g.power_watts) * Fraction(rates.power_rate_per_watt_hour)
            minutes = -(-g.interval_seconds // 60) * g.gpu_count  # per-minute billing, rounded up
            windows[(e.subject, "gpu", f"{g.gpu_model}/{g.provider_id}", minute)] += minutes * hourly / 60
        elif isinstance(e, StorageUsageEvent):
            per_month = Fraction(version.storage_per_gb_month[e.data.storage_kind])
            gb_months = Fraction(e.data.gb) * e.data.duration_seconds / (3600 * 720)
            windows[(e.subject, "storage", e.data.storage_kind, minute)] += gb_months * per_month
        elif isinstance(e, ApiRequestEvent):
            tier = plans[e.subject]
            if tier is not None:
                periods[(e.subject, f"tier:{tier}", month)] += e.data.request_count
            if e.data.product_id in version.products:
                periods[(e.subject, f"product:{e.data.product_id}", month)] += (
                    e.data.tokens_in + e.data.tokens_out
                )
    for key, amount in _compute_sessions(book, events, plans).items():
        windows[key] += amount
    totals: dict[str, int] = defaultdict(int)
    for (account, *_), amount in windows.items():
        totals[account] += round(amount * unit)  # round() of a Fraction is half-even
    version = book.versions[-1]
    for (account, what, _), used in periods.items():
        kind, _, name = what.partition(":")
        if kind == "tier":
            api = version.api_tiers[name]
            overage = max(Fraction(0), used - api.included_requests) * Fraction(api.overage_per_request)
            totals[account] += round(Fraction(api.monthly_fee) * unit) + round(overage * unit)
        else:
            totals[account] += round(
                Fraction(price(version.products[name].pricing, Decimal(int(used)))) * unit
            )
    return dict(totals)


def _compute_sessions(
    book: PriceBook, events: list[UsageEvent], plans: dict[str, str | None]
) -> dict[tuple[str, str, str, int], Fraction]:
    """Compute sessions with both ends accepted, by the account's user type, in the end's minute."""
    starts = {(e.subject, e.data.session_id): e for e in events if isinstance(e, SessionStartedEvent)}
    ends = {(e.subject, e.data.session_id): e for e in events if isinstance(e, SessionEndedEvent)}
    windows: dict[tuple[str, str, str, int], Fraction] = defaultdict(Fraction)
    for (account, session), end in ends.items():
        start, tier = starts.get((account, session)), plans[account]
        if start is None or tier is None or start.data.resource_tier is None:
            continue
        rates = book.version_at(end.time).compute_per_hour[USER_TYPES[tier]]
        if end.data.duration_seconds is not None:
            seconds = end.data.duration_seconds
        else:
            seconds = max(0, int(end.time.timestamp()) - int(start.time.timestamp()))
        end_minute = int(end.time.timestamp()) // 60
        windows[(account, "compute", start.data.resource_tier, end_minute)] += (
            seconds * Fraction(rates[start.data.resource_tier]) / 3600
        )
    return windows
