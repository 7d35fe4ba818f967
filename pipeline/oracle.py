"""An independent judge of money totals: what Postgres must hold after a run.

Shipped with Tally (as bytewax ships its testing sinks) so the exactly-once tests, ``make demo``,
the property test and the meter bench check the pipeline against the same reference. It shares
nothing with the meter but the price book's numbers: no import of ``agents``, no windows, no
watermark, no arrival order. It follows docs/PRICING.md's rules as written, in exact rationals
(``Fraction``), from the accepted events alone:
- each event is rated by the plan in force at its time (the account's plan history) and by that
  plan's book's version in force at that time;
- per (account, meter, dimensions, billing period) the exact amount is rounded half-even to base
  units once; the time meters add each event's exact amount, a GPU session ends with its time
  rounded up to the billing granularity and at least the minimum, at its latest heartbeat's rate;
- API requests and product units of a period are priced segment by segment (plan and version) in
  time order, each segment's units after the units of the segments before it;
- each API tier in force in a period, up to the end of the latest API window, owes its fee once
  (whole, or prorated by its time in force);
- failed requests (status not 2xx) pay only where the tier or product says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction

import msgspec
from sqlalchemy import Engine

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
from schemas.pricebook import (
    ApiTier,
    Flat,
    Graduated,
    Package,
    PerUnit,
    PriceBook,
    PriceBookVersion,
    Pricing,
    load_price_book,
)
from sinks.postgres import upsert_accounts, upsert_plans

TIERS = ("startup", "growth", "enterprise")
# The user type each tier's plan prices compute sessions by.
USER_TYPES = {"startup": "free", "growth": "pro", "enterprise": "enterprise"}
SECONDS_PER_HOUR = 3600
SECONDS_PER_GB_MONTH = 30 * 24 * 3600


@dataclass(frozen=True)
class PlanDef:
    book: str
    api_tier: str | None = None
    compute_user_type: str | None = None


@dataclass
class _Session:
    seconds: int = 0
    latest: tuple[datetime, str] | None = None  # (time, "source\x00id") of the latest heartbeat
    rate: Fraction = Fraction(0)  # per hour, all its GPUs
    gpu_count: int = 1
    key: tuple[str, str, str, str] = ("", "", "", "")
    period: int = 0
    granularity: int = 60
    minimum: int = 0


@dataclass
class _Segment:
    """A period's units under one plan and version, and what prices them."""

    pricing: ApiTier | Pricing
    used: int = 0


@dataclass
class _Run:
    """What a judgement accumulates: exact amounts per (account, meter, dimensions..., period),
    segments of period meters, API fee horizons, sessions."""

    linear: dict[tuple[str, ...], Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    segments: dict[tuple[str, str, int], dict[int, _Segment]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    horizons: dict[tuple[str, int], int] = field(default_factory=dict)
    sessions: dict[tuple[str, str], _Session] = field(default_factory=lambda: defaultdict(_Session))
    starts: dict[tuple[str, str], SessionStartedEvent] = field(default_factory=dict)
    ends: dict[tuple[str, str], SessionEndedEvent] = field(default_factory=dict)
    decimals: dict[str, int] = field(default_factory=dict)


@dataclass
class Judge:
    """The totals docs/PRICING.md's rules give; ``histories``: per account, (effective from in
    epoch seconds, plan; None: no plan) in any order, the earliest in force since ever."""

    books: dict[str, PriceBook]
    default_book: str
    histories: dict[str, list[tuple[int, PlanDef | None]]] = field(default_factory=dict)
    window_size: int = 60

    def plan_at(self, account: str, at: int) -> PlanDef:
        default = PlanDef(self.default_book)
        changes = sorted(self.histories.get(account, []), key=lambda c: c[0])
        current = changes[0][1] if changes else None
        for since, plan in changes:
            if since <= at:
                current = plan
        return current or default

    def rated(self, account: str, at: int) -> tuple[PlanDef, PriceBook, PriceBookVersion, int]:
        """The plan and version at ``at``, and since when both have been in force."""
        plan = self.plan_at(account, at)
        book = self.books[plan.book]
        version = [v for v in book.versions if _epoch(v.effective_from) <= at][-1]
        changes = sorted(since for since, _ in self.histories.get(account, []))[1:]
        plan_since = max([since for since in changes if since <= at], default=-(2**63))
        return plan, book, version, max(plan_since, _epoch(version.effective_from))

    def totals(self, events: list[UsageEvent]) -> dict[str, int]:
        """Per account, the base units its charges add up to."""
        run = _Run()
        for e in events:
            at = int(e.time.timestamp() // 1)
            plan, book, version, since = self.rated(e.subject, at)
            run.decimals[e.subject] = book.token.decimals
            period = _period(at)
            if isinstance(e, GpuUsageEvent):
                self._heartbeat(run, e, version, period)
            elif isinstance(e, StorageUsageEvent):
                price = Fraction(version.storage_per_gb_month[e.data.storage_kind])
                run.linear[(e.subject, "storage", e.data.storage_kind, str(period))] += (
                    Fraction(e.data.gb) * e.data.duration_seconds * price / SECONDS_PER_GB_MONTH
                )
            elif isinstance(e, ApiRequestEvent):
                self._request(run, e, plan, version, since)
            elif isinstance(e, SessionStartedEvent):
                run.starts.setdefault((e.subject, e.data.session_id), e)
            elif isinstance(e, SessionEndedEvent):
                run.ends.setdefault((e.subject, e.data.session_id), e)
        for (account, _), session in run.sessions.items():
            if session.seconds > 0:
                step = session.granularity
                billed = max(-(-session.seconds // step) * step, session.minimum)
                extra = Fraction(billed - session.seconds) * session.rate / SECONDS_PER_HOUR
                run.linear[(account, *session.key[1:], str(session.period))] += extra
        self._compute(run)
        totals: dict[str, int] = defaultdict(int)
        for (account, *_), amount in run.linear.items():
            totals[account] += _round(amount, run.decimals.get(account, 6))
        for (account, _, _), by_segment in run.segments.items():
            amount, before = Fraction(0), 0
            for _, segment in sorted(by_segment.items()):
                after = before + segment.used
                amount += _price(segment.pricing, after) - _price(segment.pricing, before)
                before = after
            totals[account] += _round(amount, run.decimals[account])
        for (account, period), horizon in run.horizons.items():
            totals[account] += self._fees(account, period, horizon, run.decimals[account])
        return dict(totals)

    def _request(
        self, run: _Run, e: ApiRequestEvent, plan: PlanDef, version: PriceBookVersion, since: int
    ) -> None:
        at = int(e.time.timestamp() // 1)
        period = _period(at)
        ok = 200 <= e.data.status < 300
        if plan.api_tier is not None:
            tier = version.api_tiers[plan.api_tier]
            if e.data.request_count and (ok or tier.charge_failed):
                run.segments[(e.subject, "api", period)].setdefault(
                    since, _Segment(tier)
                ).used += e.data.request_count
                end = at - at % self.window_size + self.window_size
                run.horizons[(e.subject, period)] = max(end, run.horizons.get((e.subject, period), 0))
        product = version.products.get(e.data.product_id or "")
        tokens = e.data.tokens_in + e.data.tokens_out
        if product is not None and tokens and (ok or product.charge_failed):
            key = (e.subject, f"product:{e.data.product_id}", period)
            run.segments[key].setdefault(since, _Segment(product.pricing)).used += tokens

    def _heartbeat(self, run: _Run, e: GpuUsageEvent, version: PriceBookVersion, period: int) -> None:
        g, rates = e.data, version.gpu
        assert rates is not None
        if rates.vram_pricing == "per_gb_hour":
            compute = Fraction(g.vram_allocated_gb) * Fraction(rates.vram_rate_per_gb_hour or 0)
        elif g.vram_total_gb > 0:
            base = Fraction(rates.base_rate_per_hour[g.gpu_model])
            compute = base * Fraction(g.vram_allocated_gb) / Fraction(g.vram_total_gb)
        else:
            compute = Fraction(rates.base_rate_per_hour[g.gpu_model])
        power = Fraction(g.power_watts) * Fraction(rates.power_rate_per_watt_hour)
        hourly = (compute + power) * Fraction(rates.demand_at(e.time, g.gpu_model))
        floor = rates.provider_minimum_per_hour.get(g.provider_id)
        if floor and Fraction(floor) > hourly:
            hourly = Fraction(floor)
        rate = hourly * g.gpu_count
        run.linear[(e.subject, "gpu", g.gpu_model, g.provider_id, str(period))] += (
            rate * g.interval_seconds / SECONDS_PER_HOUR
        )
        session = run.sessions[(e.subject, g.session_id)]
        session.seconds += g.interval_seconds
        mark = (e.time, f"{e.source}\x00{e.id}")
        if session.latest is None or mark > session.latest:
            session.latest = mark
            session.rate, session.gpu_count = rate, g.gpu_count
            session.key = (e.subject, "gpu", g.gpu_model, g.provider_id)
            session.period = period
            session.granularity = rates.billing_granularity_seconds
            session.minimum = rates.minimum_session_minutes * 60

    def _compute(self, run: _Run) -> None:
        """Compute sessions with both ends: their time, cut where plan or version changes."""
        for (account, session_id), end in run.ends.items():
            start = run.starts.get((account, session_id))
            if start is None or start.data.resource_tier is None:
                continue
            finish = int(end.time.timestamp() // 1)
            begin = (
                finish - end.data.duration_seconds
                if end.data.duration_seconds is not None
                else int(start.time.timestamp() // 1)
            )
            at = begin
            while at < finish:
                plan, book, version, _ = self.rated(account, at)
                nexts = [s for s, _ in self.histories.get(account, []) if s > at]
                nexts += [_epoch(v.effective_from) for v in book.versions if _epoch(v.effective_from) > at]
                piece_end = min([finish, *nexts])
                if plan.compute_user_type is not None:
                    rate = Fraction(
                        version.compute_per_hour[plan.compute_user_type][start.data.resource_tier]
                    )
                    key = (account, "compute", start.data.resource_tier, str(_period(piece_end - 1)))
                    run.linear[key] += (piece_end - at) * rate / SECONDS_PER_HOUR
                at = piece_end

    def _fees(self, account: str, period: int, horizon: int, decimals: int) -> int:
        period_end = _period_end(period)
        changes = sorted(self.histories.get(account, []), key=lambda c: c[0]) or [(0, None)]
        owed: dict[str, Fraction] = {}
        for index, (since, plan) in enumerate(changes):
            lo = period if index == 0 else max(since, period)
            hi = min(changes[index + 1][0] if index + 1 < len(changes) else period_end, period_end)
            if lo >= hi or lo >= horizon or plan is None or plan.api_tier is None:
                continue
            book = self.books[plan.book]
            version = [v for v in book.versions if _epoch(v.effective_from) <= lo][-1]
            tier: ApiTier = version.api_tiers[plan.api_tier]
            if tier.fee_proration == "prorated":
                owed[plan.api_tier] = owed.get(plan.api_tier, Fraction(0)) + Fraction(
                    tier.monthly_fee
                ) * Fraction(hi - lo, period_end - period)
            else:
                owed.setdefault(plan.api_tier, Fraction(tier.monthly_fee))
        return sum(_round(amount, decimals) for amount in owed.values())


def _epoch(moment: datetime) -> int:
    return int(moment.timestamp() // 1)


def _period(at: int) -> int:
    moment = datetime.fromtimestamp(at, UTC)
    return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp())


def _period_end(start: int) -> int:
    moment = datetime.fromtimestamp(start, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def _round(amount: Fraction, decimals: int) -> int:
    return round(amount * Fraction(10) ** decimals)  # round() of a Fraction is half-even


def _price(pricing: ApiTier | Pricing, units: int) -> Fraction:
    """A period's ``units`` priced: an API tier's overage, or a product's pricing model."""
    if isinstance(pricing, ApiTier):
        return max(Fraction(0), units - Fraction(pricing.included_requests)) * Fraction(
            pricing.overage_per_request
        )
    return _model_price(pricing, units)


def _model_price(pricing: Pricing, units: int) -> Fraction:
    billable = max(Fraction(0), units - Fraction(pricing.included))
    if isinstance(pricing, Flat):
        amount = Fraction(pricing.amount) if billable else Fraction(0)
    elif isinstance(pricing, PerUnit):
        amount = billable * Fraction(pricing.unit_price)
    elif isinstance(pricing, Package):
        packages = -(-billable // Fraction(pricing.package_size))
        amount = packages * Fraction(pricing.package_price)
    elif isinstance(pricing, Graduated):
        amount, floor = Fraction(0), Fraction(0)
        for t in pricing.tiers:
            top = billable if t.up_to is None else min(billable, Fraction(t.up_to))
            if top > floor:
                amount += (top - floor) * Fraction(t.unit_price) + Fraction(t.flat_fee)
            floor = top if t.up_to is None else Fraction(t.up_to)
            if billable <= floor:
                break
    else:
        chosen = next((t for t in pricing.tiers if t.up_to is None or billable <= t.up_to), pricing.tiers[-1])
        amount = billable * Fraction(chosen.unit_price) + (Fraction(chosen.flat_fee) if billable else 0)
    minimum = Fraction(pricing.minimum)
    return minimum if 0 < amount < minimum else amount


# The load generator's accounts and plans -----------------------------------------------------------


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


def tier_plan(name: str | None, book: str = "default") -> PlanDef | None:
    """The plan ``store_plans`` stores under a tier's name."""
    return None if name is None else PlanDef(book, name, USER_TYPES[name])


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


def oracle(
    settings: Settings,
    events: list[UsageEvent],
    plans: dict[str, str | None],
    changes: dict[str, list[tuple[datetime, str | None]]] | None = None,
) -> dict[str, int]:
    """Per account, the base units Postgres must hold for ``events``: every account on its tier's
    plan (``store_plans``), then on the plans ``changes`` move it to from their times."""
    books = {path.stem: load_price_book(path) for path in sorted(settings.price_books_dir.glob("*.yaml"))}
    histories: dict[str, list[tuple[int, PlanDef | None]]] = {
        account: [(-(2**63), tier_plan(tier))] for account, tier in plans.items()
    }
    for account, moves in (changes or {}).items():
        histories.setdefault(account, [(-(2**63), None)]).extend(
            (_epoch(when), tier_plan(tier)) for when, tier in moves
        )
    judge = Judge(books, settings.default_price_book, histories, int(settings.window_size.total_seconds()))
    return judge.totals(events)
