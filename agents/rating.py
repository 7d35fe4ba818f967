"""Rating: what a closed window's usage charges (pure: no I/O, no clock reads).

docs/PRICING.md states every rule this module follows; in short:
- amounts are exact: decimals (``EXACT``: 200 digits, any inexact result raises) and, where a
  VRAM share divides, fractions; nothing is rounded until a charge is made;
- a billing period (a UTC month) is the unit of rounding: per (account, meter, dimensions,
  period) the charges made so far add up to the period's exact amount rounded half-even to base
  units, once (``base_units``); each window's charge is that rounded total minus what the period
  charged before, so a correction can be negative (a credit);
- time meters (``gpu``, ``storage:<kind>``, ``compute:<tier>``) were priced per event when the
  usage was accepted (native/src/usage.rs): ``LinearPeriod`` only sums and rounds;
- period meters (``api_overage``, ``product:<id>``) are priced here, from the period's usage in
  the order of its plan-and-version segments (``SegmentedPeriod``): each segment's units at its
  own prices, positioned after the units of the segments before it, so quotas, included
  allowances and tiers count across the whole period whatever the arrival order.
"""

from __future__ import annotations

import decimal
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from functools import lru_cache

import msgspec

from schemas.pricebook import ApiTier, Flat, Graduated, Package, PerUnit, Pricing, Product, Volume

SECONDS_PER_HOUR = 3600
SECONDS_PER_MONTH = 30 * 24 * SECONDS_PER_HOUR  # storage's GB-month: 30 days
# Sums and products of prices and quantities within their bounds need at most ~120 digits; an
# operation that would round raises instead (Inexact is trapped), so no amount is ever cut.
EXACT = decimal.Context(
    prec=200,
    rounding=ROUND_HALF_EVEN,
    Emax=999_999,
    Emin=-999_999,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)
_ZERO = Decimal(0)
Money = Fraction | Decimal | int


def base_units(amount: Money, decimals: int) -> int:
    """THE rounding rule: an exact amount of tokens -> integer base units, half to even (in
    integers: ~1 us, against ~25 us through ``Fraction`` arithmetic)."""
    numerator, denominator = amount.as_integer_ratio()
    return round_half_even(numerator * 10**decimals, denominator)


@lru_cache(maxsize=4096)  # a few meters
def divisor(meter: str) -> int:
    """Time meters sum per-second amounts (GPU-seconds, GB-seconds, session seconds at an hourly
    or monthly price) and divide once, when the charge is made; 1 for the period meters (API
    requests, products: priced from the period's units at the close)."""
    if meter == "gpu" or meter.startswith("compute:"):
        return SECONDS_PER_HOUR
    if meter.startswith("storage:"):
        return SECONDS_PER_MONTH
    return 1


# Pricing models ---------------------------------------------------------------------------------


def price(pricing: Pricing, quantity: Decimal) -> Decimal:
    """The exact amount ``pricing`` charges for ``quantity`` (after its included allowance)."""
    with decimal.localcontext(EXACT):
        billable = max(_ZERO, quantity - pricing.included)
        if isinstance(pricing, Flat):
            amount = pricing.amount if billable > 0 else _ZERO
        elif isinstance(pricing, PerUnit):
            amount = billable * pricing.unit_price
        elif isinstance(pricing, Package):
            packages, rest = divmod(billable, pricing.package_size)
            amount = (packages + (1 if rest else 0)) * pricing.package_price
        elif isinstance(pricing, Graduated):
            amount, floor = _ZERO, _ZERO
            for tier in pricing.tiers:
                top = billable if tier.up_to is None else min(billable, tier.up_to)
                if top > floor:
                    amount += (top - floor) * tier.unit_price + tier.flat_fee
                floor = top if tier.up_to is None else tier.up_to
                if billable <= floor:
                    break
        elif isinstance(pricing, Volume):
            # The first tier whose bound the quantity stays within; past the last bound, the last.
            chosen = next(
                (t for t in pricing.tiers if t.up_to is None or billable <= t.up_to), pricing.tiers[-1]
            )
            amount = billable * chosen.unit_price + (chosen.flat_fee if billable > 0 else _ZERO)
        else:  # pragma: no cover - the union is closed
            raise TypeError(pricing)
        if 0 < amount < pricing.minimum:
            return pricing.minimum
        return amount


def overage(tier: ApiTier, requests: int) -> Decimal:
    """What ``requests`` in one period cost on ``tier`` beyond its fee: those over the quota."""
    with decimal.localcontext(EXACT):
        return max(0, requests - tier.included_requests) * tier.overage_per_request


# Period state -----------------------------------------------------------------------------------


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator (denominator > 0) to the nearest integer, ties to even, in ints."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2):
        quotient += 1
    return quotient


# A platform fee percent has at most 18 decimal places (price bounds): in units of 10^-18 percent
# it is an integer, so a period's fee share is an integer over FEE_SCALE.
_PERCENT_UNIT = 10**18
FEE_SCALE = 100 * _PERCENT_UNIT


class LinearPeriod(msgspec.Struct, array_like=True, gc=False):
    """A time meter's billing period as stored: its exact amount so far in the meter's own unit
    (per second for GPU and compute, per GB-second for storage: ``divisor`` is applied when
    rounding), as a decimal plus the rest over other denominators (GPU rates with a VRAM share
    that does not come out even), what it charged; for a GPU provider's charges also the platform
    fee's exact share (an integer over ``FEE_SCALE``) and what was split off. ``Linear`` is its
    working form."""

    exact: str = "0"  # Decimal text
    rest: str = "0"  # Fraction text
    charged: int = 0
    fee_exact: str = "0"  # an integer's text, over FEE_SCALE
    fee_charged: int = 0


class Linear(msgspec.Struct, gc=False):
    """A time meter's billing period while the meter works on it (numbers, not text). Not tracked
    by the garbage collector: the meter keeps thousands of them between closes, none in a cycle."""

    exact: Decimal
    rest: Fraction | None  # None: nothing over other denominators (the common case)
    charged: int
    fee_exact: int
    fee_charged: int

    @classmethod
    def of(cls, state: LinearPeriod) -> Linear:
        # Parsing a Fraction costs ~2 us: "0" is None.
        rest = None if state.rest == "0" else Fraction(state.rest)
        return cls(Decimal(state.exact), rest, state.charged, int(state.fee_exact), state.fee_charged)

    def state(self) -> LinearPeriod:
        texts = str(self.exact), "0" if self.rest is None else str(self.rest)
        return LinearPeriod(*texts, self.charged, str(self.fee_exact), self.fee_charged)

    def charge(
        self, amount: Decimal, rest: Fraction | None, per: int, decimals: int, fee_percent: Decimal | None
    ) -> tuple[int, int]:
        """Add a window's exact amount (``amount`` + ``rest``, in units of 1/``per`` of the price's
        unit; None: no rest); return (its charge, the platform fee split off it)."""
        self.exact = EXACT.add(self.exact, amount)
        numerator, denominator = self.exact.as_integer_ratio()
        if rest is not None:
            self.rest = rest if self.rest is None else self.rest + rest
        if self.rest is not None:
            total = Fraction(numerator, denominator) + self.rest
            numerator, denominator = total.numerator, total.denominator
        line = round_half_even(numerator * 10**decimals, denominator * per) - self.charged
        self.charged += line
        if fee_percent is None:
            return line, 0
        # The fee is the period's charges x the fee percent, rounded once: fee + earnings = charge.
        self.fee_exact += line * _percent_units(fee_percent)
        fee = round_half_even(self.fee_exact, FEE_SCALE) - self.fee_charged
        self.fee_charged += fee
        return line, fee


@lru_cache(maxsize=256)  # a few fee percents
def _percent_units(percent: Decimal) -> int:
    return int(percent.scaleb(18))


class Segment(msgspec.Struct, array_like=True, gc=False):
    """A period meter's usage under one plan and price-book version (from ``since``), and the
    prices it was first rated with (a snapshot: a later edit of the book does not re-price it)."""

    since: int
    used: int
    pricing: bytes  # the ApiTier or Product, as JSON
    version: str


class SegmentedPeriod(msgspec.Struct, array_like=True, gc=False):
    segments: list[Segment] = msgspec.field(default_factory=list)
    charged: int = 0

    def charge(self, meter: str, since: int, used: int, decimals: int) -> int:
        """Add a window's units to its segment (``since``, which must exist); return its charge."""
        segment = next(s for s in self.segments if s.since == since)
        segment.used += used
        line = base_units(self.exact(meter), decimals) - self.charged
        self.charged += line
        return line

    def exact(self, meter: str) -> Decimal:
        """The period's exact amount: each segment's units priced after the units before it."""
        with decimal.localcontext(EXACT):
            amount, before = _ZERO, 0
            for segment in sorted(self.segments, key=lambda s: s.since):
                after = before + segment.used
                amount += segment_price(meter, segment.pricing, after) - segment_price(
                    meter, segment.pricing, before
                )
                before = after
            return amount


def segment_price(meter: str, pricing: bytes, used: int) -> Decimal:
    if meter == "api_overage":
        return overage(_tier(pricing), used)
    return price(_product(pricing).pricing, Decimal(used))


@lru_cache(maxsize=1024)  # a period's few segments are re-priced at each of its windows
def _tier(pricing: bytes) -> ApiTier:
    return ApiTier.model_validate_json(pricing)


@lru_cache(maxsize=1024)
def _product(pricing: bytes) -> Product:
    return Product.model_validate_json(pricing)


class FeeLine(msgspec.Struct, array_like=True, gc=False):
    tier: str
    charged: int = 0
    revision: int = -1


class PeriodFees(msgspec.Struct, array_like=True, gc=False):
    """An account's API tier fees in one period: how far its API usage reached (``horizon``,
    epoch seconds: the end of its latest API window), and each tier's fee charged so far."""

    horizon: int = 0
    lines: list[FeeLine] = msgspec.field(default_factory=list)

    def line(self, tier: str) -> FeeLine:
        found = next((line for line in self.lines if line.tier == tier), None)
        if found is None:
            found = FeeLine(tier)
            self.lines.append(found)
        return found
