"""Meter, second part: tumbling windows on event time, rated when they close.

An accepted event adds its usage to the window of its event time, per (account, meter,
dimensions), priced by the plan and price-book version in force at that time; a window never spans
a change of either (its start is then the moment of the change). The partition's watermark is the
latest event time it has seen (or, after ``idle`` seconds without input, the wall clock the shell
passes in, so the last windows of a quiet stream close too). A window closes when the watermark
passes its tumbling end plus the grace period; it is then rated and its charges leave in the same
Kafka transaction as the state change.

An event whose window already closed, but within the correction horizon of the watermark, is an
adjustment: the poll's late events of one window are rated together as the window's next revision
(a new charge id, never an edit). An event older than the horizon is ``too_late``.

Two halves, one per side of a window's life:
- adding usage, once per event, is compiled: ``tally_native.WindowCore`` (native/src/window.rs,
  usage.rs, sessions.rs) prices each event exactly by the plan and version at its time and sums it
  into its window; GPU sessions' rounding and compute sessions are metered there too;
- closing and rating, once per charge row, is here (``Windows.close``), by ``agents.rating``'s
  rule: per billing period, the charges add up to the period's exact amount rounded once.

State, all of it written once per commit as (key, value) changes in the meter's changelog record
(deleted keys have an empty value), and read back through ``read`` (the partition store): open
windows (in memory while open), adjusted windows' last revision (a close is revision 0), GPU and
compute sessions, period states (``LINEAR``, ``SEGMENTS``), API fees per period, the watermark
(keys and records: ``agents.window_state``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from tally_native import WindowCore

from agents.plans import NativeBooks, Plans
from agents.rating import (
    FeeLine,
    Linear,
    LinearPeriod,
    PeriodFees,
    Segment,
    SegmentedPeriod,
    base_units,
    divisor,
)
from agents.window_state import (
    CLOSED,
    FEES,
    LINEAR,
    OPEN,
    SEGMENTS,
    Dims,
    Stored,
    Tally,
    WindowKey,
    closed_revision,
    codec,
    decode_key,
    period_decoders,
    period_of,
    state_key,
    tally_decoder,
    utc_time,
)
from schemas.charges import Charge, charge_id_of, dims_text
from schemas.events import UsageEvent, encoder
from schemas.pricebook import PriceBook
from schemas.rejections import Reason, Rejection, Stage

log = logging.getLogger(__name__)

UNIT_PRICE_PLACES = Decimal("1e-12")
_ZERO = Decimal(0)
S = TypeVar("S", LinearPeriod, SegmentedPeriod, PeriodFees)
PeriodState = Linear | SegmentedPeriod | PeriodFees
# Period states kept decoded between closes (a period's windows close all along it); past this
# many the cache starts over from the store.
PERIOD_CACHE_SIZE = 200_000


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size: int = 60  # seconds
    grace: int = 300
    horizon: int = 35 * 86_400
    idle_timeout: int = 300  # a GPU session without a heartbeat for this long has ended


class UnpricedError(LookupError):
    """The account's plan cannot rate this event."""


class TooLateError(LookupError):
    """The event is older than the correction horizon."""


class SessionConflictError(LookupError):
    """A compute session already has a different start (or end)."""


_REFUSALS: dict[str, type[LookupError]] = {
    "too_late": TooLateError,
    "unpriced": UnpricedError,
    "session_conflict": SessionConflictError,
}


@dataclass(slots=True)
class WindowResult:
    charges: list[Charge] = field(default_factory=list)
    changes: dict[bytes, bytes] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)  # windows that could not be priced
    closed: int = 0
    adjustments: int = 0


class Windows:
    """The windows of one input partition: the native core adds usage, ``close`` rates."""

    def __init__(
        self, config: WindowConfig, plans: Plans, read: Callable[[bytes], bytes | None], stored: Stored
    ) -> None:
        self.config = config
        self.plans = plans
        self.read = read
        self.native = NativeBooks()
        # Period states as of the last commit, decoded (a failed transaction drops the task and
        # this with it, so it never holds an uncommitted change past its close).
        self.periods: dict[bytes, PeriodState] = {}
        self.core = WindowCore(
            size=config.size,
            grace=config.grace,
            horizon=config.horizon,
            idle_timeout=config.idle_timeout,
            plan_of=lambda account: self.native.plans(plans.history_of(account)),
            read=read,
            open_windows=stored.open_windows,
            gpu_sessions=stored.gpu_sessions,
            watermark=stored.watermark,
        )

    @property
    def watermark(self) -> int:
        return self.core.watermark

    @property
    def open(self) -> dict[WindowKey, Tally]:
        """The open windows, decoded (for tests and tools; the meter never needs them)."""
        return {decode_key(k): tally_decoder.decode(v) for k, v in self.core.open_windows()}

    def add(self, event: UsageEvent) -> None:
        """Add one accepted event's usage; raises ``TooLateError``, ``UnpricedError`` or
        ``SessionConflictError`` (then nothing of the event is added). The meter adds events
        inside the native core without this call (``tally_native.MeterCore``); this is the same
        core's entry for a decoded event."""
        refusal = self.core.add(encoder.encode(event))
        if refusal is not None:
            reason, detail = refusal
            raise _REFUSALS[reason](detail)

    def close(self, rated_at: datetime, wall_clock: int | None = None) -> WindowResult:
        """Rate every window the watermark closed (``wall_clock``, when given, advances it: the
        partition was idle) and every adjustment; return the charges and the state changes."""
        result = WindowResult()
        closing = _Closing(self, result, rated_at)
        due, late = self.core.close(wall_clock)
        for raw_key, raw_tally in due:
            # Revision 0, with nothing to read or write of revisions: the core opens a window only
            # before its close time and the watermark never goes back, so it closes once.
            closing.rate(raw_key, tally_decoder.decode(raw_tally), revision=0)
            result.changes[raw_key] = b""  # the window leaves the open set
        for raw_key, raw_tally in late:
            # Adjustments count from 1 (whether or not the window had usage when it closed); the
            # last one is kept (``CLOSED``) for the next.
            closed = CLOSED + raw_key[len(OPEN) :]
            revision = closed_revision(_get(result.changes, closed, self.read)) + 1
            result.changes[closed] = codec.encode(revision)
            closing.rate(raw_key, tally_decoder.decode(raw_tally), revision)
            result.adjustments += 1
        closing.fees()
        result.closed = len(due)
        result.changes.update(self.core.changes())  # open windows that changed, sessions, watermark
        closing.write()
        return result

    def book(self, name: str | None) -> PriceBook | None:
        return None if name is None else self.plans.book(name)


class _Closing:
    """One close: the period states it reads and changes (written once, at the end)."""

    def __init__(self, windows: Windows, result: WindowResult, rated_at: datetime) -> None:
        self.windows = windows
        self.result = result
        self.rated_at = rated_at
        self.states: dict[bytes, PeriodState] = {}
        self.fee_periods: dict[tuple[str, int], int] = {}  # (account, period start) -> horizon
        self.decimals: dict[str | None, int] = {}

    def _state(self, key: bytes, kind: type[S]) -> PeriodState:
        """A period state: this close's, the last commit's (decoded), or the store's."""
        found = self.states.get(key) or self.windows.periods.get(key)
        if found is None:
            raw = _get(self.result.changes, key, self.windows.read)
            stored = period_decoders[kind].decode(raw) if raw else kind()
            found = Linear.of(stored) if isinstance(stored, LinearPeriod) else stored
        self.states[key] = found
        return found

    def _linear(self, key: bytes) -> Linear:
        found = self.states.get(key) or self.windows.periods.get(key)
        if found is None:
            raw = _get(self.result.changes, key, self.windows.read)
            found = Linear.of(period_decoders[LinearPeriod].decode(raw) if raw else LinearPeriod())
        self.states[key] = found
        assert type(found) is Linear
        return found

    def _segments(self, key: bytes) -> SegmentedPeriod:
        found = self._state(key, SegmentedPeriod)
        assert isinstance(found, SegmentedPeriod)
        return found

    def _fees(self, key: bytes) -> PeriodFees:
        found = self._state(key, PeriodFees)
        assert isinstance(found, PeriodFees)
        return found

    def write(self) -> None:
        periods = self.windows.periods
        if len(periods) + len(self.states) > PERIOD_CACHE_SIZE:
            periods.clear()
        for key, state in self.states.items():
            self.result.changes[key] = codec.encode(state.state() if isinstance(state, Linear) else state)
            periods[key] = state

    def rate(self, raw_key: bytes, tally: Tally, revision: int) -> None:
        """Rate one window (``raw_key``: its ``OPEN`` state key, as the native core gives it) as its
        ``revision``."""
        key = decode_key(raw_key)
        account, meter, dims, start = key
        decimals = self._decimals(tally.book)
        period = period_of(start)
        per = divisor(meter)
        if per == 1:  # a period meter
            line = self._period_line(key, tally, revision, period, decimals)
            if line is None:
                # Dead-lettered: nothing charged, but the revision is used, so a later adjustment
                # of the window that cannot be priced either gets an identity of its own.
                return
            fee = 0
            quantity = Decimal(tally.quantity)
            unit_price = (Decimal(line).scaleb(-decimals) / quantity).quantize(UNIT_PRICE_PLACES)
        else:
            state = self._linear(state_key(LINEAR, (account, meter, dims, period[0])))
            rest = tally.rest() if tally.fractions else None
            line, fee = state.charge(tally.amount, rest, per, decimals, tally.fee_percent)
            quantity = Decimal(tally.quantity) / per
            # A time meter's window has its own exact price: its amount over its quantity.
            if not tally.quantity:
                unit_price = _ZERO
            elif rest is not None:
                exact = (Fraction(tally.amount) + rest) / Fraction(tally.quantity)
                unit_price = Decimal(exact.numerator) / Decimal(exact.denominator)
            else:
                unit_price = tally.amount / tally.quantity
            unit_price = unit_price.quantize(UNIT_PRICE_PLACES)
        self.result.charges.append(
            _charge(key, revision, tally.unit, quantity, unit_price, line, tally, fee, self.rated_at)
        )

    def _decimals(self, book: str | None) -> int:
        """The base units of the token a window's book charges in."""
        found = self.decimals.get(book)
        if found is None:
            priced = self.windows.book(book) or self.windows.plans.default_book
            found = self.decimals[book] = priced.token.decimals
        return found

    def _period_line(
        self, key: WindowKey, tally: Tally, revision: int, period: tuple[int, int], decimals: int
    ) -> int | None:
        """A period meter's window: its units join their segment; the charge is the period's
        rounded exact amount minus what it charged before. None when the window's prices cannot
        be found any more (its usage is dead-lettered, replayable)."""
        account, meter, dims, start = key
        scope = "api_overage" if meter == "api_overage" else meter  # requests count across tiers
        state = self._segments(state_key(SEGMENTS, (account, scope, (), period[0])))
        if not any(s.since == tally.since for s in state.segments):
            pricing = self._pricing(meter, dims, tally)
            if isinstance(pricing, str):
                self._unpriced(key, tally, revision, pricing)
                return None
            state.segments.append(Segment(tally.since, 0, pricing, tally.version))
        assert isinstance(tally.quantity, int)  # requests and tokens are counted
        line = state.charge(meter, tally.since, tally.quantity, decimals)
        if meter == "api_overage":
            end = start - start % self.windows.config.size + self.windows.config.size
            self.fee_periods[(account, period[0])] = max(end, self.fee_periods.get((account, period[0]), 0))
        return line

    def _pricing(self, meter: str, dims: Dims, tally: Tally) -> bytes | str:
        """The prices of a window's segment as JSON, or why they cannot be found."""
        book = self.windows.book(tally.book)
        if book is None:
            return f"price book {tally.book!r} cannot be loaded"
        version = book.version_labelled(tally.version)
        if version is None:
            return f"price book {book.name!r} has no version from {tally.version} any more"
        if meter == "api_overage":
            tier = dict(dims).get("tier", "")
            found = version.api_tiers.get(tier)
            if found is None:
                return f"no API tier {tier!r} in price book {book.name!r} version {tally.version}"
            return found.model_dump_json().encode()
        product = version.products.get(meter.removeprefix("product:"))
        if product is None:
            return f"no price for {meter} in price book {book.name!r} version {tally.version}"
        return product.model_dump_json().encode()

    def _unpriced(self, key: WindowKey, tally: Tally, revision: int, why: str) -> None:
        """Dead-letter a window's usage as one API request event of its account and start, which
        the meter accepts again once replayed (a new identity: the window's next charge id)."""
        account, meter, _, start = key
        identity = _charge_id(key, revision)
        assert isinstance(tally.quantity, int)
        data: dict[str, Any] = {"endpoint": "*", "request_count": 0, "status": 200}
        if meter == "api_overage":
            data["request_count"] = tally.quantity
        else:
            data |= {"product_id": meter.removeprefix("product:"), "tokens_in": tally.quantity}
        event = {
            "specversion": "1.0",
            "id": str(identity),
            "source": "tally/meter/unpriced",
            "type": "api.request.v1",
            "time": _start_text(start),
            "subject": account,
            "data": data,
        }
        self.result.rejected.append(
            Rejection(
                reason=Reason.UNPRICED,
                detail=f"{meter} window from {_start_text(start)}: {why}",
                original=msgspec.json.encode(event),
                origin=f"window/{account}/{meter}/{start}",
                stage=Stage.METER,
            )
        )

    def fees(self) -> None:
        """Each API tier in force in a period, up to its latest API window's end, owes its fee
        (whole, or prorated by its time in force); a fee line charges what is owed minus what
        was charged before (a plan history corrected later credits the difference)."""
        plans = self.windows.plans
        for (account, start), horizon in self.fee_periods.items():
            state = self._fees(state_key(FEES, (account, "api_fee", (), start)))
            state.horizon = max(state.horizon, horizon)
            end = period_of(start)[1]
            owed: dict[str, tuple[Fraction, Decimal, str, int]] = {}
            for lo, hi, plan in plans.history_of(account).spans(start, end):
                if lo >= state.horizon or plan.api_tier is None or plan.book is None:
                    continue
                try:
                    version = plan.book.version_at(utc_time(lo))
                except LookupError:
                    log.warning("meter: %s: no price-book version for its %s fee", account, plan.api_tier)
                    continue
                tier = version.api_tiers.get(plan.api_tier)
                if tier is None:
                    log.warning("meter: %s: API tier %r is not in its price book", account, plan.api_tier)
                    continue
                share = Fraction(hi - lo, end - start) if tier.fee_proration == "prorated" else Fraction(1)
                amount, fee, label, decimals = owed.get(plan.api_tier, (Fraction(0), tier.monthly_fee, "", 0))
                if tier.fee_proration == "prorated" or not label:
                    amount += share * Fraction(tier.monthly_fee)
                owed[plan.api_tier] = (amount, fee, label or version.label, plan.book.token.decimals)
            for tier_name, (amount, fee, label, decimals) in sorted(owed.items()):
                self._fee_line(account, start, state.line(tier_name), amount, fee, label, decimals)

    def _fee_line(  # noqa: PLR0917  # one positional per fact of the line
        self, account: str, start: int, line: FeeLine, owed: Fraction, fee: Decimal, label: str, decimals: int
    ) -> None:
        amount = base_units(owed, decimals) - line.charged
        if amount == 0:
            return
        line.revision += 1
        line.charged += amount
        key = (account, "api_fee", (("tier", line.tier),), start)
        share = owed / Fraction(fee) if fee else Fraction(1)
        tally = Tally(Decimal(1), fee, "period", label)
        quantity = (Decimal(share.numerator) / Decimal(share.denominator)).quantize(UNIT_PRICE_PLACES)
        self.result.charges.append(
            _charge(key, line.revision, "period", quantity.normalize(), fee, amount, tally, 0, self.rated_at)
        )


def _get(changes: dict[bytes, bytes], key: bytes, read: Callable[[bytes], bytes | None]) -> bytes | None:
    value = changes.get(key)
    return (value or None) if value is not None else read(key)


def _charge_id(key: WindowKey, revision: int) -> UUID:
    account, meter, dims, start = key
    return charge_id_of(account, meter, _dims_text(dims), _start_text(start), revision)


def _charge(  # noqa: PLR0917  # one positional per column
    key: WindowKey,
    revision: int,
    unit: str,
    quantity: Decimal,
    unit_price: Decimal,
    amount: int,
    tally: Tally,
    fee: int,
    rated_at: datetime,
) -> Charge:
    account, meter, dims, start = key
    return Charge(
        charge_id=_charge_id(key, revision),
        account=account,
        meter=meter,
        dimensions=dict(dims),
        window_start=_start_time(start),
        revision=revision,
        quantity=str(quantity),
        unit=unit,
        unit_price=str(unit_price),
        amount_base_units=amount,
        price_version=tally.version,
        provider_id=tally.provider,
        platform_fee_base_units=fee,
        rated_at=rated_at,
    )


@lru_cache(maxsize=4096)  # per (model, provider), tier or product: few, one text per charge row
def _dims_text(dims: Dims) -> str:
    return dims_text(dims)


@lru_cache(maxsize=4096)  # the windows a close rates share a few starts
def _start_time(start: int) -> datetime:
    return utc_time(start)


@lru_cache(maxsize=4096)
def _start_text(start: int) -> str:
    return _start_time(start).isoformat()
