"""Rating: usage in, charge lines out (pure: no I/O, no clock reads).

Every amount is computed exactly with ``Decimal`` and turned into the token's base units once per
charge line, by the one rounding rule (``to_base_units``: half-even at the base unit). docs/PRICING.md
has the rule and worked examples. A line says what was rated (quantity, unit, unit price), the
exact and the rounded amount, and the price-book version used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from schemas.pricebook import (
    ApiTier,
    Flat,
    GpuRates,
    Graduated,
    Package,
    PerUnit,
    PriceBook,
    PriceBookVersion,
    Pricing,
    Volume,
)
from schemas.quote import ApiQuote, GpuQuote, QuoteLine, StorageQuote

SECONDS_PER_HOUR = Decimal(3600)
HOURS_PER_MONTH = Decimal(720)  # storage's GB-month: 30 days
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class ChargeLine:
    meter: str  # gpu, api_fee, api_overage, product:<id>, compute, storage:<kind>, one_time:<item>
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal  # exact, before rounding
    amount_base_units: int  # what is charged
    price_version: str


def to_base_units(amount: Decimal, decimals: int) -> int:
    """THE rounding rule: exact amount -> integer base units, half-even, once per charge line."""
    return int((amount * (Decimal(10) ** decimals)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def line(  # noqa: PLR0917  # one positional per column of a charge line
    meter: str,
    quantity: Decimal,
    unit: str,
    unit_price: Decimal,
    amount: Decimal,
    version: PriceBookVersion,
    decimals: int,
) -> ChargeLine:
    return ChargeLine(
        meter, quantity, unit, unit_price, amount, to_base_units(amount, decimals), version.label
    )


# Pricing models ---------------------------------------------------------------------------------


def price(pricing: Pricing, quantity: Decimal) -> Decimal:
    """The exact amount ``pricing`` charges for ``quantity`` (after its included allowance)."""
    billable = max(_ZERO, quantity - pricing.included)
    if isinstance(pricing, Flat):
        amount = pricing.amount
    elif isinstance(pricing, PerUnit):
        amount = billable * pricing.unit_price
    elif isinstance(pricing, Package):
        amount = Decimal(math.ceil(billable / pricing.package_size)) * pricing.package_price
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
        # The first tier whose bound the quantity stays within; past the last bound, the last tier.
        chosen = next((t for t in pricing.tiers if t.up_to is None or billable <= t.up_to), pricing.tiers[-1])
        amount = billable * chosen.unit_price + (chosen.flat_fee if billable > 0 else _ZERO)
    else:  # pragma: no cover - the union is closed
        raise TypeError(pricing)
    if amount > 0 and amount < pricing.minimum:
        return pricing.minimum
    return amount


# GPU rental (seed 000) ----------------------------------------------------------------------------


def billable_seconds(seconds: int, rates: GpuRates, session_total_seconds: int | None = None) -> int:
    """Rounds up to the billing granularity (per minute by default); a session shorter than the
    minimum length is billed the minimum (``session_total_seconds`` given at session end)."""
    step = rates.billing_granularity_seconds
    billed = -(-seconds // step) * step  # ceiling division in integers: no float in between
    if session_total_seconds is not None:
        billed = max(billed, rates.minimum_session_minutes * 60)
    return billed


def gpu_hourly_rate(  # noqa: PLR0917  # the seed's pricing inputs, in its order
    rates: GpuRates,
    gpu_model: str,
    vram_total_gb: Decimal,
    vram_allocated_gb: Decimal,
    power_watts: Decimal,
    demand: Decimal | None = None,
    provider_minimum: Decimal | None = None,
) -> Decimal:
    """Price per hour of one GPU: VRAM-weighted base (or per-GB) + power, times demand, floored
    at the provider's minimum rate."""
    if rates.vram_pricing == "fractional":
        share = vram_allocated_gb / vram_total_gb if vram_total_gb > 0 else Decimal(1)
        compute = rates.base_rate_per_hour[gpu_model] * share
    else:
        assert rates.vram_rate_per_gb_hour is not None  # the model validator guarantees it
        compute = vram_allocated_gb * rates.vram_rate_per_gb_hour
    hourly = compute + power_watts * rates.power_rate_per_watt_hour
    multiplier = demand or rates.demand_multiplier
    if multiplier != 1:  # x * 1 is x, digits and exponent alike: skipped, as most books have none
        hourly *= multiplier
    return max(hourly, provider_minimum) if provider_minimum else hourly


def rate_gpu(
    version: PriceBookVersion,
    decimals: int,
    gpu_model: str,
    seconds: int,
    *,
    gpu_count: int = 1,
    vram_total_gb: Decimal,
    vram_allocated_gb: Decimal,
    power_watts: Decimal,
    demand: Decimal | None = None,
    provider_minimum: Decimal | None = None,
) -> ChargeLine:
    rates = version.gpu
    if rates is None:
        raise LookupError(f"price book version {version.label} has no GPU rates")
    if gpu_model not in rates.base_rate_per_hour:
        raise LookupError(f"no rate for GPU model {gpu_model!r}")
    hourly = gpu_hourly_rate(
        rates, gpu_model, vram_total_gb, vram_allocated_gb, power_watts, demand, provider_minimum
    )
    hours = Decimal(seconds) / SECONDS_PER_HOUR * gpu_count
    return line("gpu", hours, "gpu_hour", hourly, hours * hourly, version, decimals)


def split_platform_fee(amount_base_units: int, rates: GpuRates) -> tuple[int, int]:
    """(platform fee, provider earnings) of a charge, in base units; they add up to the charge
    exactly (the fee is rounded half-even, the provider gets the rest)."""
    fee = to_base_units(Decimal(amount_base_units) * rates.platform_fee_percent / 100, 0)
    return fee, amount_base_units - fee


# API tiers (seed 004) -------------------------------------------------------------------------------


def rate_api_requests(
    version: PriceBookVersion, decimals: int, tier_name: str, used_before: int, requests: int
) -> tuple[ChargeLine | None, int]:
    """Overage for ``requests`` more in a billing period where ``used_before`` were already used:
    only requests beyond the included quota pay, and each request is counted once, whatever
    windows the period's requests arrive in. Returns (overage line or None, used after)."""
    tier = _tier(version, tier_name)
    used_after = used_before + requests
    over = max(0, used_after - tier.included_requests) - max(0, used_before - tier.included_requests)
    if over == 0:
        return None, used_after
    quantity = Decimal(over)
    amount = quantity * tier.overage_per_request
    return line(
        "api_overage", quantity, "request", tier.overage_per_request, amount, version, decimals
    ), used_after


def rate_api_fee(version: PriceBookVersion, decimals: int, tier_name: str) -> ChargeLine:
    tier = _tier(version, tier_name)
    return line("api_fee", Decimal(1), "period", tier.monthly_fee, tier.monthly_fee, version, decimals)


def _tier(version: PriceBookVersion, tier_name: str) -> ApiTier:
    try:
        return version.api_tiers[tier_name]
    except KeyError:
        raise LookupError(f"no API tier {tier_name!r} in price book version {version.label}") from None


# Products, compute, storage, one-time (seeds 002, 003) ----------------------------------------------


def rate_product(version: PriceBookVersion, decimals: int, product_id: str, quantity: Decimal) -> ChargeLine:
    product = version.products.get(product_id)
    if product is None:
        raise LookupError(f"no price for product {product_id!r}")
    amount = price(product.pricing, quantity)
    unit_price = amount / quantity if quantity > 0 else _ZERO
    return line(f"product:{product_id}", quantity, product.unit, unit_price, amount, version, decimals)


def rate_compute(
    version: PriceBookVersion, decimals: int, user_type: str, resource_tier: str, seconds: int
) -> ChargeLine:
    try:
        hourly = version.compute_per_hour[user_type][resource_tier]
    except KeyError:
        raise LookupError(f"no compute rate for {user_type!r} x {resource_tier!r}") from None
    hours = Decimal(seconds) / SECONDS_PER_HOUR
    return line(f"compute:{resource_tier}", hours, "hour", hourly, hours * hourly, version, decimals)


def rate_storage(
    version: PriceBookVersion, decimals: int, kind: str, gb: Decimal, seconds: int
) -> ChargeLine:
    try:
        per_gb_month = version.storage_per_gb_month[kind]
    except KeyError:
        raise LookupError(f"no storage rate for {kind!r}") from None
    gb_months = gb * Decimal(seconds) / SECONDS_PER_HOUR / HOURS_PER_MONTH
    return line(
        f"storage:{kind}", gb_months, "gb_month", per_gb_month, gb_months * per_gb_month, version, decimals
    )


def rate_one_time(version: PriceBookVersion, decimals: int, item: str) -> ChargeLine:
    try:
        amount = version.one_time[item]
    except KeyError:
        raise LookupError(f"no one-time price for {item!r}") from None
    return line(f"one_time:{item}", Decimal(1), "item", amount, amount, version, decimals)


# Quotes: usage lines without Kafka or a database (``tally quote``) --------------------------------


@dataclass
class QuoteSession:
    """Rates quote lines in order. API quota used per (subject, tier, month) carries across lines,
    so a period's included requests and overage are rated over all of them."""

    book: PriceBook
    default_plan: str | None = None
    quota_used: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def period_fees(self) -> list[tuple[str, str, str, ChargeLine]]:
        """(subject, tier, month, fee line) for every billing period the API lines touched."""
        decimals = self.book.token.decimals
        fees = []
        for subject, tier, month in sorted(self.quota_used):
            version = self.book.version_at(datetime.fromisoformat(f"{month}-01T00:00:00+00:00"))
            fees.append((subject, tier, month, rate_api_fee(version, decimals, tier)))
        return fees

    def rate(self, usage: QuoteLine) -> list[ChargeLine]:
        version = self.book.version_at(usage.time)
        decimals = self.book.token.decimals
        plan = usage.plan or self.default_plan
        if isinstance(usage, GpuQuote):
            rates = version.gpu
            if rates is None:
                raise LookupError(f"price book version {version.label} has no GPU rates")
            gpu = usage.data
            minimum = Decimal(usage.provider_minimum) if usage.provider_minimum else None
            return [
                rate_gpu(
                    version,
                    decimals,
                    gpu.gpu_model,
                    billable_seconds(gpu.interval_seconds, rates),
                    gpu_count=gpu.gpu_count,
                    vram_total_gb=gpu.vram_total_gb,
                    vram_allocated_gb=gpu.vram_allocated_gb,
                    power_watts=gpu.power_watts,
                    provider_minimum=minimum,
                )
            ]
        if isinstance(usage, ApiQuote):
            api = usage.data
            lines: list[ChargeLine] = []
            if plan is not None:
                period = (usage.subject, plan, usage.time.strftime("%Y-%m"))
                overage, self.quota_used[period] = rate_api_requests(
                    version, decimals, plan, self.quota_used.get(period, 0), api.request_count
                )
                lines += [overage] if overage else []
            if api.product_id is not None and api.product_id in version.products:
                tokens = Decimal(api.tokens_in + api.tokens_out)
                lines.append(rate_product(version, decimals, api.product_id, tokens))
            if plan is None and not lines:
                raise LookupError("an API request needs a plan (API tier) or a priced product_id")
            return lines
        if isinstance(usage, StorageQuote):
            held = usage.data
            return [rate_storage(version, decimals, held.storage_kind, held.gb, held.duration_seconds)]
        # ComputeQuote: a finished session, by user type (the plan) and resource tier (seed 002).
        if plan is None:
            raise LookupError("a compute session needs a plan (the user type)")
        if usage.data.duration_seconds is None:
            raise LookupError("a compute session needs data.duration_seconds")
        return [rate_compute(version, decimals, plan, usage.resource_tier, usage.data.duration_seconds)]
