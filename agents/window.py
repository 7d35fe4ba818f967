"""Meter, second part: tumbling windows on event time, rated when they close (pure core).

An accepted event adds its usage to the window ``[start, start + size)`` of its event time, per
(account, meter, dimensions). The partition's watermark is the latest event time it has seen (or,
after ``idle`` seconds without input, the wall clock the shell passes in, so the last windows of a
quiet stream close too). A window closes when the watermark passes its end plus the grace period;
it is then rated and its charges leave in the same Kafka transaction as the state change.

An event whose window already closed, but within the correction horizon of the watermark, is an
adjustment: the poll's late events of one window are rated together as the window's next revision
(a new charge id, never an edit). An event older than the horizon is ``too_late``.

How a charge is computed, so that totals never depend on how events fell into windows, polls or
revisions (the property the exactly-once test checks against an oracle, to the base unit):
- linear meters (``gpu``, ``storage:<kind>``) keep the window's exact amount; revision r charges
  ``to_base_units(exact total after r) - charged before r``;
- period meters (``api_overage``, ``product:<id>``) keep the quantity used in the billing period
  (a UTC month): a window charges ``to_base_units(price(used after)) - to_base_units(price(used
  before))``, so included quotas, tiers and rounding apply to the period once, whatever the windows;
- ``api_fee``: the tier's fee, once per account and period, when its first usage is rated.
Both sums telescope: over a window's revisions, or a period's windows, the charges add up to the
rounded exact total.

Two halves, one per side of a window's life:
- adding usage, once per event, is compiled: ``tally_native.WindowCore`` (native/src/window.rs)
  meters each event (``gpu`` per (model, provider), ``storage:<kind>``, ``api_overage`` per tier,
  ``product:<id>``, ``compute:<tier>`` once both ends of a session are seen) and sums its
  quantity and exact amount into the window's ``Tally`` in the same decimal arithmetic as
  ``agents.rating`` (the GPU rate operation for operation: tests/unit/test_window.py holds the
  two to the same digits);
- closing and rating, once per charge row, is here (``Windows.close``).

State, all of it written once per commit as (key, value) changes in the meter's changelog record
(deleted keys have an empty value), and read back through ``read`` (the partition store):
open windows (in memory while open), closed windows (revision and totals, for adjustments),
period usage, fees charged, compute sessions half seen, and the watermark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from tally_native import WindowCore

from agents.rating import HOURS_PER_MONTH, SECONDS_PER_HOUR, price, split_platform_fee, to_base_units
from schemas.charges import Charge, charge_id_of, dims_text
from schemas.events import UsageEvent, encoder
from schemas.pricebook import PriceBook, PriceBookVersion

if TYPE_CHECKING:
    from tally_native import BookData

# State keys. Identity marks (dedupe) share the store: their keys are ``source\x00id`` with a
# non-empty source, so they never start with NUL; these all do.
OPEN = b"\x00o"
CLOSED = b"\x00c"
PERIOD = b"\x00p"
SESSION = b"\x00s"
WATERMARK = b"\x00watermark"

Dims = tuple[tuple[str, str], ...]
WindowKey = tuple[str, str, Dims, int]  # account, meter, dimensions, window start (epoch seconds)
PERIOD_METERS = ("api_overage", "product:")
UNIT_PRICE_PLACES = Decimal("1e-12")
# Price-book versions looked up per (book, window start): a day of 60 s windows is 1,440 entries.
VERSION_CACHE_SIZE = 10_000
SECONDS_PER_MONTH = SECONDS_PER_HOUR * HOURS_PER_MONTH
_ZERO = Decimal(0)
_ONE = Decimal(1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_codec = msgspec.msgpack.Encoder()
_key_decoder = msgspec.msgpack.Decoder(tuple[str, str, list[tuple[str, str]], int])


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size: int = 60  # seconds
    grace: int = 300
    horizon: int = 35 * 86_400


@dataclass(frozen=True, slots=True)
class AccountPlan:
    """How an account is rated: its price book, its API tier (seed 004) and the user type its
    compute sessions are priced by (seed 002)."""

    book: PriceBook
    api_tier: str | None = None
    compute_user_type: str | None = None  # seed 002's user type; None: sessions are not charged


class Plans(Protocol):
    """Where the meter finds each account's plan (``pipeline.plans.PlanDirectory``)."""

    def plan_of(self, account: str) -> AccountPlan: ...

    def refresh(self, force: bool = False) -> None: ...


class UnpricedError(LookupError):
    """The account's price book cannot rate this event."""


class TooLateError(LookupError):
    """The event is older than the correction horizon."""


class Tally(msgspec.Struct, array_like=True, gc=False):
    """A window's usage so far (or a closed window's totals): quantity, exact amount, unit,
    price-book version, provider; for a closed window also its last revision and what it charged."""

    quantity: Decimal | int  # int for counted meters (requests, tokens): an int sum is ~10x cheaper
    amount: Decimal
    unit: str
    version: str
    provider: str | None = None
    revision: int = -1
    charged: int = 0


class PeriodUsage(msgspec.Struct, array_like=True, gc=False):
    used: Decimal = _ZERO
    charged: int = 0


class SessionSide(msgspec.Struct, array_like=True, gc=False):
    """A compute session one of whose ends has been seen (epoch seconds); written by the native
    core (native/src/window.rs), in this struct's encoding."""

    started_at: int | None = None
    resource_tier: str | None = None
    ended_at: int | None = None
    duration: int | None = None


_tally_decoder = msgspec.msgpack.Decoder(Tally)
_period_decoder = msgspec.msgpack.Decoder(PeriodUsage)


def state_key(prefix: bytes, key: WindowKey) -> bytes:
    account, meter, dims, start = key
    return prefix + _codec.encode((account, meter, dims, start))


def decode_key(raw: bytes) -> WindowKey:
    account, meter, dims, start = _key_decoder.decode(raw[len(OPEN) :])
    return account, meter, tuple(dims), start


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def period_of(epoch: int) -> int:
    """The billing period (a UTC calendar month) holding ``epoch``, as its start."""
    moment = _dt(epoch)
    return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp())


@dataclass(slots=True)
class WindowResult:
    charges: list[Charge] = field(default_factory=list)
    changes: dict[bytes, bytes] = field(default_factory=dict)
    closed: int = 0
    adjustments: int = 0


class Windows:
    """The windows of one input partition: the native core adds usage, ``close`` rates."""

    def __init__(
        self,
        config: WindowConfig,
        plan_of: Callable[[str], AccountPlan],
        read: Callable[[bytes], bytes | None],
        open_windows: Iterable[tuple[bytes, bytes]],
        watermark: int,
    ) -> None:
        """``open_windows``: the store's ``OPEN`` entries as stored (``load_windows``)."""
        self.config = config
        self.plan_of = plan_of
        self.read = read
        self.core = WindowCore(
            config.size,
            config.grace,
            config.horizon,
            plan_of,
            read,
            native_book,
            list(open_windows),
            watermark,
        )
        self._versions: dict[tuple[str, int], PriceBookVersion] = {}

    @property
    def watermark(self) -> int:
        return self.core.watermark

    @property
    def open(self) -> dict[WindowKey, Tally]:
        """The open windows, decoded (for tests and tools; the meter never needs them)."""
        return {decode_key(k): _tally_decoder.decode(v) for k, v in self.core.open_windows()}

    def add(self, event: UsageEvent) -> None:
        """Add one accepted event's usage; raises ``TooLateError`` or ``UnpricedError`` (then
        nothing of the event is added). The meter adds events inside the native core without
        this call (``tally_native.MeterCore``); this is the same core's entry for a decoded event."""
        refusal = self.core.add(encoder.encode(event))
        if refusal is not None:
            reason, detail = refusal
            raise (TooLateError if reason == "too_late" else UnpricedError)(detail)

    def _version(self, book: PriceBook, start: int) -> PriceBookVersion:
        version = self._versions.get((book.name, start))
        if version is None:
            if len(self._versions) >= VERSION_CACHE_SIZE:  # a long-running meter sees ever new windows
                self._versions.clear()
            version = self._versions[(book.name, start)] = book.version_at(_dt(start))
        return version

    # Closing --------------------------------------------------------------------------------

    def close(self, rated_at: datetime, wall_clock: int | None = None) -> WindowResult:
        """Rate every window the watermark closed (``wall_clock``, when given, advances it: the
        partition was idle) and every adjustment; return the charges and the state changes."""
        result = WindowResult()
        closing, late = self.core.close(wall_clock)
        periods: dict[bytes, PeriodUsage] = {}
        for raw_key, raw_tally in closing:
            self._rate(decode_key(raw_key), _tally_decoder.decode(raw_tally), rated_at, result, periods)
            result.changes[raw_key] = b""  # the window leaves the open set
        for raw_key, raw_tally in late:
            self._rate(decode_key(raw_key), _tally_decoder.decode(raw_tally), rated_at, result, periods)
            result.adjustments += 1
        result.closed = len(closing)
        result.changes.update(self.core.changes())  # open windows that changed, sessions, watermark
        for raw, usage in periods.items():
            result.changes[raw] = _codec.encode(usage)
        return result

    def _rate(
        self,
        key: WindowKey,
        tally: Tally,
        rated_at: datetime,
        result: WindowResult,
        periods: dict[bytes, PeriodUsage],
    ) -> None:
        account, meter, dims, start = key
        closed_key = state_key(CLOSED, key)
        previous = _get(result.changes, closed_key, self.read)
        before = _tally_decoder.decode(previous) if previous else None
        revision = before.revision + 1 if before else 0
        total_amount = tally.amount + (before.amount if before else _ZERO)
        charged_before = before.charged if before else 0
        plan = self.plan_of(account)
        version = self._version(plan.book, start)
        decimals = plan.book.token.decimals
        if meter.startswith(PERIOD_METERS):
            period_key = state_key(PERIOD, (account, meter, dims, period_of(start)))
            usage = periods.get(period_key) or _period(result.changes, period_key, self.read)
            used_after = usage.used + tally.quantity
            total = to_base_units(period_price(meter, plan, version, used_after), decimals)
            # Never negative: a volume-tiered price can fall as usage grows; a period never
            # refunds what it charged (docs/PRICING.md).
            amount = max(0, total - usage.charged)
            periods[period_key] = PeriodUsage(used_after, usage.charged + amount)
            if meter == "api_overage":
                self._fee(account, dims, start, plan, version, rated_at, result, periods)
            # The period's price per unit is what this window's units were charged.
            exact = Decimal(amount) / Decimal(10) ** decimals
        else:
            amount = to_base_units(total_amount / divisor(meter), decimals) - charged_before
            exact = tally.amount  # per second for time meters: the divisor cancels out below
        unit_price = (exact / tally.quantity if tally.quantity else _ZERO).quantize(UNIT_PRICE_PLACES)
        fee = 0
        if tally.provider is not None and version.gpu is not None:
            fee, _ = split_platform_fee(amount, version.gpu)
        quantity = tally.quantity / divisor(meter)
        result.charges.append(
            _charge(key, revision, tally, quantity, unit_price, amount, version.label, fee, rated_at)
        )
        closed = Tally(
            tally.quantity + (before.quantity if before else _ZERO),
            total_amount,
            tally.unit,
            tally.version,
            tally.provider,
            revision,
            charged_before + amount,
        )
        result.changes[closed_key] = _codec.encode(closed)

    def _fee(  # noqa: PLR0917  # the rating context of the window being closed
        self,
        account: str,
        dims: Dims,
        start: int,
        plan: AccountPlan,
        version: PriceBookVersion,
        rated_at: datetime,
        result: WindowResult,
        periods: dict[bytes, PeriodUsage],
    ) -> None:
        """The tier's fee, once per account and billing period (an idempotent charge id)."""
        period = period_of(start)
        fee_key = state_key(PERIOD, (account, "api_fee", dims, period))
        if fee_key in periods or _get(result.changes, fee_key, self.read) is not None:
            return
        assert plan.api_tier is not None  # api_overage exists only for accounts with a tier
        tier = version.api_tiers[plan.api_tier]
        amount = to_base_units(tier.monthly_fee, plan.book.token.decimals)
        periods[fee_key] = PeriodUsage(Decimal(1), amount)
        tally = Tally(Decimal(1), tier.monthly_fee, "period", version.label)
        key = (account, "api_fee", dims, period)
        result.charges.append(
            _charge(key, 0, tally, Decimal(1), tier.monthly_fee, amount, version.label, 0, rated_at)
        )


def _get(changes: dict[bytes, bytes], key: bytes, read: Callable[[bytes], bytes | None]) -> bytes | None:
    value = changes.get(key)
    return (value or None) if value is not None else read(key)


def _period(changes: dict[bytes, bytes], key: bytes, read: Callable[[bytes], bytes | None]) -> PeriodUsage:
    raw = _get(changes, key, read)
    return _period_decoder.decode(raw) if raw else PeriodUsage()


def _charge(  # noqa: PLR0917  # one positional per column
    key: WindowKey,
    revision: int,
    tally: Tally,
    quantity: Decimal,
    unit_price: Decimal,
    amount: int,
    version: str,
    fee: int,
    rated_at: datetime,
) -> Charge:
    account, meter, dims, start = key
    dimensions = dict(dims)
    window_start = _dt(start)
    return Charge(
        charge_id=charge_id_of(account, meter, _dims_text(dims), _start_text(start), revision),
        account=account,
        meter=meter,
        dimensions=dimensions,
        window_start=window_start,
        revision=revision,
        quantity=str(quantity),
        unit=tally.unit,
        unit_price=str(unit_price),
        amount_base_units=amount,
        price_version=version,
        provider_id=tally.provider,
        platform_fee_base_units=fee,
        rated_at=rated_at,
    )


# What an event contributes --------------------------------------------------------------------


def divisor(meter: str) -> Decimal:
    """Time-based meters add up seconds (GPU-seconds, GB-seconds) and amounts per second, and
    divide once, when a charge is made: a per-event ``seconds / 3600`` would round every event
    at Decimal's 28 digits, this rounds once per charge line."""
    if meter == "gpu":
        return SECONDS_PER_HOUR
    if meter.startswith("storage:"):
        return SECONDS_PER_MONTH
    if meter.startswith("compute:"):
        return SECONDS_PER_HOUR
    return _ONE


@lru_cache(maxsize=4096)  # per (model, provider), tier or product: few, one text per charge row
def _dims_text(dims: Dims) -> str:
    return dims_text(dims)


@lru_cache(maxsize=4096)  # the windows a close rates share a few starts
def _start_text(start: int) -> str:
    return _dt(start).isoformat()


def period_price(meter: str, plan: AccountPlan, version: PriceBookVersion, used: Decimal) -> Decimal:
    """The exact amount a billing period's usage ``used`` of a period meter costs."""
    if meter == "api_overage":
        assert plan.api_tier is not None
        tier = version.api_tiers[plan.api_tier]
        return max(_ZERO, used - tier.included_requests) * tier.overage_per_request
    return price(version.products[meter.removeprefix("product:")].pricing, used)


# What the native core reads of a price book ----------------------------------------------------


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def native_book(book: PriceBook) -> BookData:
    """A price book as plain tuples for ``tally_native.WindowCore`` (prices as decimal text): what
    adding usage needs (rating a closed window reads the book itself)."""
    versions: list[tuple[Any, ...]] = []
    for version in book.versions:
        gpu = None
        if version.gpu is not None:
            rates = version.gpu
            gpu = (
                [(model, str(rate)) for model, rate in rates.base_rate_per_hour.items()],
                rates.vram_pricing == "per_gb_hour",
                None if rates.vram_rate_per_gb_hour is None else str(rates.vram_rate_per_gb_hour),
                str(rates.power_rate_per_watt_hour),
                str(rates.demand_multiplier),
                [(_micros(s.effective_from), str(s.multiplier), s.gpu_models) for s in rates.demand_schedule],
                [(provider, str(rate)) for provider, rate in rates.provider_minimum_per_hour.items()],
                rates.billing_granularity_seconds,
            )
        versions.append(
            (
                _micros(version.effective_from),
                version.label,
                gpu,
                list(version.api_tiers),
                [(product_id, product.unit) for product_id, product in version.products.items()],
                [
                    (user_type, [(tier, str(rate)) for tier, rate in tiers.items()])
                    for user_type, tiers in version.compute_per_hour.items()
                ],
                [(kind, str(rate)) for kind, rate in version.storage_per_gb_month.items()],
            )
        )
    return book.name, versions
