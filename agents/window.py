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

State, all of it written once per commit as (key, value) changes in the meter's changelog record
(deleted keys have an empty value), and read back through ``read`` (the partition store):
open windows (in memory while open), closed windows (revision and totals, for adjustments),
period usage, fees charged, and the watermark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache, lru_cache

import msgspec

from agents.rating import (
    HOURS_PER_MONTH,
    SECONDS_PER_HOUR,
    billable_seconds,
    gpu_hourly_rate,
    price,
    split_platform_fee,
    to_base_units,
)
from schemas.charges import Charge, charge_id_of, dims_text
from schemas.events import (
    ApiRequestEvent,
    GpuUsageEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    StorageUsageEvent,
    UsageEvent,
)
from schemas.pricebook import PriceBook, PriceBookVersion

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
    """A compute session one of whose ends has been seen (epoch seconds)."""

    started_at: int | None = None
    resource_tier: str | None = None
    ended_at: int | None = None
    duration: int | None = None


_tally_decoder = msgspec.msgpack.Decoder(Tally)
_session_decoder = msgspec.msgpack.Decoder(SessionSide)
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
    """The windows of one input partition."""

    def __init__(
        self,
        config: WindowConfig,
        plan_of: Callable[[str], AccountPlan],
        read: Callable[[bytes], bytes | None],
        open_windows: dict[WindowKey, Tally],
        watermark: int,
    ) -> None:
        self.config = config
        self.plan_of = plan_of
        self.read = read
        self.open = open_windows
        self.watermark = watermark
        self._stored_watermark = watermark
        self._dirty: set[WindowKey] = set()
        self._late: dict[WindowKey, Tally] = {}
        self._versions: dict[tuple[str, int], PriceBookVersion] = {}
        self._session_changes: dict[bytes, bytes] = {}
        # The (book, window start, version) of the last event: consecutive events mostly share it.
        self._last_version: tuple[PriceBook | None, int, PriceBookVersion | None] = (None, -1, None)

    # Adding usage ---------------------------------------------------------------------------

    def add(self, event: UsageEvent) -> None:
        """Add one accepted event's usage; raises ``TooLateError`` or ``UnpricedError`` (then nothing of
        the event is added). Called once per event: helpers are inlined and the price-book version
        of the previous event's window is reused (~1 us per event less than a call each, here)."""
        # Whole seconds since the epoch, floored: ~140 ns against ~270 for ``timestamp()`` and the
        # float floor division after it (event times are UTC, so the subtraction reads no offset).
        # Every bound it meets is whole seconds too, so flooring decides nothing differently.
        elapsed = event.time - _EPOCH
        moment = elapsed.days * 86_400 + elapsed.seconds
        config = self.config
        watermark = self.watermark
        if moment < watermark - config.horizon:
            raise TooLateError(f"time {event.time.isoformat()} is older than the correction horizon")
        start = moment - moment % config.size
        account = event.subject
        plan = self.plan_of(account)
        last_book, last_start, last_version = self._last_version
        if last_version is not None and last_book is plan.book and last_start == start:
            version = last_version
        else:
            version = self._version(plan.book, start)
            self._last_version = (plan.book, start, version)
        if type(event) is SessionStartedEvent or type(event) is SessionEndedEvent:
            joined = self._join_session(event, plan, version)
            if joined is None:
                parts: list[Part] = []
            else:  # both ends seen: the session is charged in its end's window
                start = int(joined[0] // config.size) * config.size
                version = self._version(plan.book, start)
                parts = joined[1]
        else:
            parts = usage_of(event, plan, version, start)
        open_windows = self.open
        for meter, dims, quantity, amount, unit, provider in parts:
            key = (account, meter, dims, start)
            tally = open_windows.get(key)
            if tally is None:
                if start + config.size + config.grace <= self.watermark:  # closed: an adjustment
                    tally = self._late.get(key)
                    if tally is None:
                        tally = self._late[key] = _new_tally(quantity, unit, version.label, provider)
                    tally.quantity += quantity
                    tally.amount += amount
                    continue
                tally = open_windows[key] = _new_tally(quantity, unit, version.label, provider)
            tally.quantity += quantity
            tally.amount += amount
            self._dirty.add(key)
        if moment > watermark:
            self.watermark = moment

    def _join_session(
        self, event: SessionStartedEvent | SessionEndedEvent, plan: AccountPlan, version: PriceBookVersion
    ) -> tuple[int, list[Part]] | None:
        """Seed 002's compute sessions: the start (resource tier) and the end (duration) may come
        in either order; the first one seen waits in state (``SESSION`` keys, written with the
        poll's changes), the second one charges the session in the end's window. Returns (end
        time, parts) once both are seen, else None."""
        key = SESSION + _codec.encode((event.subject, event.data.session_id))
        raw = self._session_changes.get(key)
        raw = (raw or None) if raw is not None else self.read(key)
        seen = _session_decoder.decode(raw) if raw else SessionSide()
        at = int(event.time.timestamp())
        if isinstance(event, SessionStartedEvent):
            tier = event.data.resource_tier
            user_type = plan.compute_user_type
            if tier and user_type and tier not in version.compute_per_hour.get(user_type, {}):
                raise UnpricedError(f"no compute rate for {user_type!r} x {tier!r} in {version.label}")
            seen.started_at, seen.resource_tier = at, tier
        else:
            seen.ended_at, seen.duration = at, event.data.duration_seconds
        if seen.started_at is None or seen.ended_at is None:
            self._session_changes[key] = _codec.encode(seen)
            return None
        self._session_changes[key] = b""  # joined: the session leaves the state
        seconds = seen.duration if seen.duration is not None else max(0, seen.ended_at - seen.started_at)
        rates = version.compute_per_hour.get(plan.compute_user_type or "", {})
        if seen.resource_tier is None or seen.resource_tier not in rates:
            return None  # a session without a priced tier or user type is usage, not a charge
        quantity = Decimal(seconds)
        meter = f"compute:{seen.resource_tier}"
        return seen.ended_at, [(meter, (), quantity, quantity * rates[seen.resource_tier], "hour", None)]

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
        if wall_clock is not None and wall_clock > self.watermark:
            self.watermark = wall_clock
        reach = self.config.size + self.config.grace
        closing = sorted(k for k in self.open if k[3] + reach <= self.watermark)
        periods: dict[bytes, PeriodUsage] = {}
        for key in closing:
            self._rate(key, self.open.pop(key), rated_at, result, periods)
            self._dirty.discard(key)
            result.changes[state_key(OPEN, key)] = b""
        for key in sorted(self._late):
            self._rate(key, self._late[key], rated_at, result, periods)
            result.adjustments += 1
        self._late.clear()
        result.closed = len(closing)
        for key in self._dirty:
            result.changes[state_key(OPEN, key)] = _codec.encode(self.open[key])
        self._dirty.clear()
        for raw, usage in periods.items():
            result.changes[raw] = _codec.encode(usage)
        result.changes.update(self._session_changes)
        self._session_changes.clear()
        if self.watermark != self._stored_watermark:
            result.changes[WATERMARK] = str(self.watermark).encode()
            self._stored_watermark = self.watermark
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


def _new_tally(quantity: Decimal | int, unit: str, version: str, provider: str | None) -> Tally:
    """An empty window's tally, counting in ints for a counted meter and in ``Decimal`` else."""
    return Tally(0 if type(quantity) is int else _ZERO, _ZERO, unit, version, provider)


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

# meter, dims, quantity, amount, unit, provider; counted meters' quantities are ints.
Part = tuple[str, Dims, Decimal | int, Decimal, str, str | None]


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


@cache  # a handful of tiers and products: one tuple or string each, not one per event
def _tier_dims(tier: str) -> Dims:
    return (("tier", tier),)


@cache
def _product_meter(product_id: str) -> str:
    return f"product:{product_id}"


def usage_of(event: UsageEvent, plan: AccountPlan, version: PriceBookVersion, start: int) -> list[Part]:
    """The metered parts of one event: what it adds to which window (pure)."""
    if isinstance(event, GpuUsageEvent):
        gpu = event.data
        rates = version.gpu
        if rates is None or gpu.gpu_model not in rates.base_rate_per_hour:
            raise UnpricedError(f"no GPU rate for {gpu.gpu_model!r} in price book {version.label}")
        demand = rates.demand_at(_dt(start), gpu.gpu_model) if rates.demand_schedule else None
        minimum = rates.provider_minimum_per_hour.get(gpu.provider_id)
        hourly = gpu_hourly_rate(
            rates, gpu.gpu_model, gpu.vram_total_gb, gpu.vram_allocated_gb, gpu.power_watts, demand, minimum
        )
        seconds = Decimal(billable_seconds(gpu.interval_seconds, rates) * gpu.gpu_count)
        dims = (("gpu_model", gpu.gpu_model), ("provider_id", gpu.provider_id))
        return [("gpu", dims, seconds, seconds * hourly, "gpu_hour", gpu.provider_id)]
    if isinstance(event, ApiRequestEvent):
        api = event.data
        parts: list[Part] = []
        if plan.api_tier is not None:
            if plan.api_tier not in version.api_tiers:
                raise UnpricedError(f"no API tier {plan.api_tier!r} in price book {version.label}")
            requests = api.request_count
            parts.append(("api_overage", _tier_dims(plan.api_tier), requests, _ZERO, "request", None))
        if api.product_id is not None and api.product_id in version.products:
            product = version.products[api.product_id]
            tokens = api.tokens_in + api.tokens_out
            parts.append((_product_meter(api.product_id), (), tokens, _ZERO, product.unit, None))
        # Neither: the request is usage (analytics count it) that this account's plan does not
        # charge for, as a free tier's endpoints are.
        return parts
    if isinstance(event, StorageUsageEvent):
        held = event.data
        per_gb_month = version.storage_per_gb_month.get(held.storage_kind)
        if per_gb_month is None:
            raise UnpricedError(f"no storage rate for {held.storage_kind!r} in price book {version.label}")
        gb_seconds = held.gb * held.duration_seconds
        meter = f"storage:{held.storage_kind}"
        return [(meter, (), gb_seconds, gb_seconds * per_gb_month, "gb_month", None)]
    # Session start/end events are joined by ``Windows`` (compute sessions); GPU time is billed
    # from the heartbeats.
    return []


def period_price(meter: str, plan: AccountPlan, version: PriceBookVersion, used: Decimal) -> Decimal:
    """The exact amount a billing period's usage ``used`` of a period meter costs."""
    if meter == "api_overage":
        assert plan.api_tier is not None
        tier = version.api_tiers[plan.api_tier]
        return max(_ZERO, used - tier.included_requests) * tier.overage_per_request
    return price(version.products[meter.removeprefix("product:")].pricing, used)
