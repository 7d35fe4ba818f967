"""Rating core: the seeds' cases, the pricing models, and properties of money (issue 4)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.rating import (
    ChargeLine,
    price,
    rate_api_fee,
    rate_api_requests,
    rate_compute,
    rate_gpu,
    rate_one_time,
    rate_product,
    rate_storage,
    split_platform_fee,
    to_base_units,
)
from schemas.pricebook import Graduated, PriceBookError, Volume, load_price_book, parse_price_book

DEFAULT = Path(__file__).resolve().parents[2] / "schemas" / "pricebooks" / "default.yaml"
BOOK = load_price_book(DEFAULT)
V = BOOK.version_at(datetime(2026, 11, 24, tzinfo=UTC))
D = BOOK.token.decimals


def gpu(
    model: str,
    seconds: int,
    total_gb: int,
    allocated_gb: int,
    watts: int,
    *,
    demand: Decimal | None = None,
    provider_minimum: Decimal | None = None,
) -> ChargeLine:
    """One GPU charge line with the default book."""
    return rate_gpu(
        V,
        D,
        model,
        seconds,
        vram_total_gb=Decimal(total_gb),
        vram_allocated_gb=Decimal(allocated_gb),
        power_watts=Decimal(watts),
        demand=demand,
        provider_minimum=provider_minimum,
    )


def usdc(text: str) -> int:
    return to_base_units(Decimal(text), D)


def test_startup_tier_12000_requests_in_a_period_cost_20_usdc_of_overage() -> None:
    overage, used = rate_api_requests(V, D, "startup", used_before=0, requests=12_000)
    assert overage is not None
    assert (overage.quantity, overage.amount_base_units, used) == (Decimal(2000), usdc("20"), 12_000)
    assert rate_api_fee(V, D, "startup").amount_base_units == usdc("50")


def test_quota_is_consumed_once_across_windows() -> None:
    used, total = 0, 0
    for requests in (6_000, 3_000, 2_000, 1_000):  # the same 12,000 requests in four windows
        overage, used = rate_api_requests(V, D, "startup", used, requests)
        total += overage.amount_base_units if overage else 0
    assert total == usdc("20")


def test_growth_and_enterprise_tiers() -> None:
    growth, _ = rate_api_requests(V, D, "growth", 0, 100_001)
    enterprise, _ = rate_api_requests(V, D, "enterprise", 499_999, 2)
    assert growth is not None and growth.amount_base_units == usdc("0.005")
    assert enterprise is not None and enterprise.amount_base_units == usdc("0.002")


def test_sixty_minutes_at_2_5_per_hour_is_2_5() -> None:
    # An a100 (2.00/h base) at a full card, 500 W (+0.50/h): 2.50 per hour.
    charge = gpu("a100", 3600, 80, 80, 500)
    assert charge.unit_price == Decimal("2.5")
    assert charge.amount_base_units == usdc("2.5")


def test_half_a_24_gb_card_pays_half_the_base_rate() -> None:
    half = gpu("rtx_4090", 3600, 24, 12, 0)
    assert half.amount_base_units == usdc("0.25")


def test_power_adds_to_the_hourly_rate_and_the_provider_minimum_floors_it() -> None:
    with_power = gpu("rtx_4090", 3600, 24, 24, 350)
    assert with_power.unit_price == Decimal("0.85")  # 0.50 + 350 W x 0.001
    floored = gpu("rtx_4090", 60, 24, 6, 0, provider_minimum=Decimal("1.20"))
    assert floored.unit_price == Decimal("1.20")
    doubled = gpu("h100", 1800, 80, 80, 0, demand=Decimal(2))
    assert doubled.amount_base_units == usdc("4")


def test_platform_fee_splits_a_charge_exactly() -> None:
    assert V.gpu is not None
    fee, provider = split_platform_fee(2_500_000, V.gpu)
    assert (fee, provider) == (125_000, 2_375_000)
    fee, provider = split_platform_fee(7, V.gpu)
    assert fee + provider == 7


def test_user_type_table_per_hour() -> None:
    assert rate_compute(V, D, "free", "gpu", 3600).amount_base_units == usdc("0.25")
    assert rate_compute(V, D, "pro", "gpu", 3600).amount_base_units == usdc("0.125")
    assert rate_compute(V, D, "enterprise", "medium", 7200).amount_base_units == usdc("0.03")
    assert rate_compute(V, D, "admin", "large", 3600).amount_base_units == 0


def test_storage_per_gb_month_and_one_time_purchases() -> None:
    month = 30 * 86_400
    assert rate_storage(V, D, "bucket", Decimal(100), month).amount_base_units == usdc("2")
    assert rate_storage(V, D, "filestore", Decimal(10), month // 2).amount_base_units == usdc("0.85")
    assert rate_one_time(V, D, "ml_ready_environment").amount_base_units == usdc("5")


def test_product_unit_price_free_tier_and_models() -> None:
    assert rate_product(V, D, "gpt-4", Decimal(1000)).amount_base_units == usdc("2")  # seed 003: 2.00
    assert rate_product(V, D, "claude-3", Decimal(1000)).amount_base_units == 0  # within free tier
    assert rate_product(V, D, "claude-3", Decimal(3000)).amount_base_units == usdc("3")
    assert rate_product(V, D, "embed-small", Decimal(1001)).amount_base_units == usdc("0.02")  # 2 packages
    graduated = rate_product(V, D, "llama-3-70b", Decimal(1_500_000))
    assert graduated.amount_base_units == usdc("1050")  # 1M x 0.0008 + 0.5M x 0.0005


def test_volume_tiers_price_everything_at_the_tier_reached_and_minimums_apply() -> None:
    volume = Volume.model_validate(
        {
            "model": "tiered_volume",
            "minimum": "1",
            "tiers": [{"up_to": 100, "unit_price": "0.10"}, {"unit_price": "0.05"}],
        }
    )
    assert price(volume, Decimal(100)) == Decimal("10.00")
    assert price(volume, Decimal(101)) == Decimal("5.05")
    assert price(volume, Decimal(5)) == Decimal(1)  # the minimum charge
    assert price(volume, Decimal(0)) == 0


def test_rounding_is_half_even_once_per_line() -> None:
    assert to_base_units(Decimal("0.0000005"), 6) == 0
    assert to_base_units(Decimal("0.0000015"), 6) == 2
    assert to_base_units(Decimal("2.4999995"), 6) == 2_500_000


def test_a_version_applies_from_its_effective_date() -> None:
    text = (
        DEFAULT.read_text().replace("name: default", "name: two")
        + """
  - effective_from: "2026-12-01T00:00:00Z"
    api_tiers:
      startup: {monthly_fee: "60", included_requests: 10000, overage_per_request: "0.02"}
"""
    )
    book = parse_price_book(text)
    november = book.version_at(datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
    december = book.version_at(datetime(2026, 12, 1, tzinfo=UTC))
    assert rate_api_fee(november, D, "startup").amount_base_units == usdc("50")
    assert rate_api_fee(december, D, "startup").price_version == "2026-12-01T00:00:00Z"
    with pytest.raises(LookupError):
        book.version_at(datetime(2025, 1, 1, tzinfo=UTC))


def test_every_problem_in_a_file_is_reported_with_its_path_and_line() -> None:
    text = """name: broken
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    api_tiers:
      startup: {monthly_fee: "-50", included_requests: 10000, overage_per_request: "0.01"}
    products:
      x: {pricing: {model: tiered_graduated,
                    tiers: [{up_to: 10, unit_price: "1"}, {up_to: 5, unit_price: "2"}]}}
    gpu:
      base_rate_per_hour: {a100: "two"}
"""
    with pytest.raises(PriceBookError) as caught:
        parse_price_book(text, "broken.yaml")
    problems = caught.value.problems
    assert len(problems) == 3
    assert any(p.startswith("broken.yaml:5: versions.0.api_tiers.startup.monthly_fee") for p in problems)
    assert any(p.startswith("broken.yaml:8: versions.0.products.x.pricing.tiers") for p in problems)
    assert any(p.startswith("broken.yaml:10: versions.0.gpu.base_rate_per_hour.a100") for p in problems)


def test_a_price_has_at_most_28_significant_digits() -> None:
    """Money is computed at 28 digits; the meter's native core reads prices exactly."""
    text = """
name: long
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    storage_per_gb_month: {bucket: "0.12345678901234567890123456789"}
"""
    with pytest.raises(PriceBookError, match="at most 28 significant digits"):
        parse_price_book(text)
    assert parse_price_book(text.replace('789"', '78"'))  # 28 digits: a price


def test_yaml_numbers_are_read_exactly() -> None:
    book = parse_price_book("""name: n
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    storage_per_gb_month: {bucket: 0.01}
""")
    assert book.versions[0].storage_per_gb_month["bucket"] == Decimal("0.01")


quantities = st.decimals(min_value=0, max_value=10**9, places=3, allow_nan=False, allow_infinity=False)
tiers = Graduated.model_validate(
    {
        "model": "tiered_graduated",
        "tiers": [
            {"up_to": 1000, "unit_price": "0.01"},
            {"up_to": 5000, "unit_price": "0.008", "flat_fee": "1"},
            {"unit_price": "0.005"},
        ],
    }
)


@given(quantities)
def test_prices_are_never_negative(quantity: Decimal) -> None:
    assert price(tiers, quantity) >= 0
    for product in V.products:
        assert rate_product(V, D, product, quantity).amount_base_units >= 0


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=5_000), min_size=1, max_size=20), st.randoms())
def test_quota_total_does_not_depend_on_arrival_order_or_windows(windows: list[int], rnd: object) -> None:
    def total(batches: list[int]) -> int:
        used, amount = 0, 0
        for requests in batches:
            overage, used = rate_api_requests(V, D, "startup", used, requests)
            amount += overage.amount_base_units if overage else 0
        return amount

    shuffled = list(windows)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]  # hypothesis' Random
    once, _ = rate_api_requests(V, D, "startup", 0, sum(windows))
    assert total(windows) == total(shuffled) == (once.amount_base_units if once else 0)


@given(st.lists(st.integers(min_value=1, max_value=7_200), min_size=1, max_size=10))
def test_splitting_usage_across_windows_moves_the_total_by_at_most_the_rounding(pieces: list[int]) -> None:
    def h100(seconds: int) -> int:
        return gpu("h100", seconds, 80, 20, 333).amount_base_units

    split_total = sum(h100(s) for s in pieces)
    whole = h100(sum(pieces))
    # Each line rounds once, by at most half a base unit: n pieces and the whole, n + 1 roundings.
    assert 2 * abs(split_total - whole) <= len(pieces) + 1
