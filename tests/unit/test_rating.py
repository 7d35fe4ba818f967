"""Rating: the pricing models, the default book's worked examples, period arithmetic, price books."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.plans import AccountPlan
from agents.rating import Linear, LinearPeriod, Segment, SegmentedPeriod, base_units, overage, price
from schemas.pricebook import (
    ApiTier,
    PriceBookError,
    Product,
    Volume,
    load_price_book,
    parse_price_book,
)
from tests.unit.windows_support import T0, Partition, event

DEFAULT = Path(__file__).resolve().parents[2] / "schemas" / "pricebooks" / "default.yaml"
BOOK = load_price_book(DEFAULT)
V = BOOK.version_at(datetime(2026, 11, 24, tzinfo=UTC))
D = BOOK.token.decimals


def usdc(text: str) -> int:
    return base_units(Decimal(text), D)


def product(name: str, quantity: int) -> int:
    return usdc(str(price(V.products[name].pricing, Decimal(quantity))))


def test_the_default_books_api_tiers() -> None:
    """12,000 requests on startup: 2,000 over the 10,000 included at 0.01 = 20."""
    assert overage(V.api_tiers["startup"], 12_000) == Decimal("20.00")
    assert overage(V.api_tiers["growth"], 100_001) == Decimal("0.005")
    assert overage(V.api_tiers["enterprise"], 500_001) == Decimal("0.002")
    assert overage(V.api_tiers["startup"], 9_999) == 0


def test_the_default_books_products_and_models() -> None:
    assert product("gpt-4", 1000) == usdc("2")  # 0.002 per token
    assert product("claude-3", 1000) == 0  # within its free 1,000
    assert product("claude-3", 3000) == usdc("3")
    assert product("embed-small", 1001) == usdc("0.02")  # 2 packages of 1,000
    assert product("llama-3-70b", 1_500_000) == usdc("1050")  # 1M x 0.0008 + 0.5M x 0.0005


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


def test_the_default_books_time_meters_on_the_window_core() -> None:
    """GPU, compute and storage of the default book's worked examples, each account its own."""
    p = Partition({"acct-ent": AccountPlan(BOOK, None, "enterprise")})
    hour = [T0 - timedelta(hours=3, minutes=-m) for m in range(60)]
    full_a100 = {"gpu_model": "a100", "vram_total_gb": "80", "vram_allocated_gb": "80", "power_watts": "500"}
    p.poll(
        *(event("gpu.usage.v1", t, "acct-a100", i, **full_a100) for i, t in enumerate(hour)),
        *(event("gpu.usage.v1", t, "acct-half", i, power_watts="0") for i, t in enumerate(hour)),
        event("storage.usage.v1", T0, "acct-store", 1, gb="100", duration_seconds=30 * 86_400),
        event("session.started.v1", T0, "acct-ent", 1),
        event("session.ended.v1", T0 + timedelta(hours=2), "acct-ent", 2),
    )
    p.finish()
    assert p.total("acct-a100") == usdc("2.5")  # (2.00 x 80/80 + 500 W x 0.001) x 1 h
    assert p.total("acct-half") == usdc("0.25")  # 0.50 x 12/24 x 1 h
    assert p.total("acct-store") == usdc("2")  # 100 GB for 30 days at 0.02 per GB-month
    assert p.total("acct-ent") == usdc("0.03")  # 2 h of medium for enterprise at 0.015/h
    fees = sum(c.platform_fee_base_units for c in p.charges if c.account == "acct-a100")
    assert fees == 125_000  # 5% of 2.5, split off once per period


def test_rounding_is_half_even() -> None:
    assert base_units(Decimal("0.0000005"), 6) == 0
    assert base_units(Decimal("0.0000015"), 6) == 2
    assert base_units(Decimal("2.4999995"), 6) == 2_500_000
    assert base_units(Fraction(5, 3200), 6) == 1_562  # 1,562.5: to the even neighbour


def test_prices_are_exact_far_beyond_28_digits() -> None:
    """A product of a 28-digit price and a large count keeps every digit (no 28-digit cut)."""
    big = Product.model_validate(
        {"pricing": {"model": "per_unit", "unit_price": "1234567890.123456789012345678"}}
    )
    amount = price(big.pricing, Decimal(987_654_321_987))
    digits = 1234567890123456789012345678 * 987_654_321_987
    assert Fraction(amount) == Fraction(digits, 10**18)  # every digit of the product
    assert len(amount.as_tuple().digits) > 28


@given(st.lists(st.integers(min_value=-(10**9), max_value=10**12), min_size=1, max_size=30))
def test_a_linear_periods_lines_add_up_to_its_total_rounded_once(pieces: list[int]) -> None:
    """However a period's exact amount arrives (windows, revisions, corrections of either sign),
    its charges add up to the total rounded once, and each fee is its charge's share."""
    period = Linear.of(LinearPeriod())
    lines, fees, total = [], [], Fraction(0)
    for i, piece in enumerate(pieces):
        # Alternately a decimal amount (no rest: None, as a window without VRAM shares passes) and
        # one with a fraction (a VRAM share), over the divisor.
        amount, rest = (Decimal(piece), None) if i % 2 == 0 else (Decimal(piece // 3), Fraction(piece % 7, 3))
        line, fee = period.charge(amount, rest, 7 * 10**7, 6, Decimal("5"))
        total += (Fraction(amount) + (rest or 0)) / (7 * 10**7)
        lines.append(line)
        fees.append(fee)
        assert abs(fee) <= abs(line) and fee * line >= 0
    assert sum(lines) == base_units(total, 6)
    assert sum(fees) == round(Fraction(sum(lines)) * 5 / 100)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5_000)), min_size=1, max_size=20),
    st.randoms(),
)
def test_a_segmented_periods_total_does_not_depend_on_arrival_order(
    windows: list[tuple[int, int]], rnd: object
) -> None:
    """Windows of six segments (plan-and-version spans) in any order: the same total, each
    segment's units priced after those of the segments before it in time."""
    tiers = [
        ApiTier(monthly_fee=Decimal(0), included_requests=included, overage_per_request=Decimal(rate))
        for included, rate in [(100, "0.01"), (0, "0.02"), (5_000, "0.005"), (0, "0"), (50, "1"), (10, "0.3")]
    ]

    def total(order: list[tuple[int, int]]) -> int:
        period = SegmentedPeriod()
        charged = 0
        for since, used in order:
            if not any(s.since == since for s in period.segments):
                period.segments.append(Segment(since, 0, tiers[since].model_dump_json().encode(), "v"))
            charged += period.charge("api_overage", since, used, 6)
        return charged

    shuffled = list(windows)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]  # hypothesis' Random
    expected, before = Fraction(0), 0
    for since in range(6):
        used = sum(n for s, n in windows if s == since)
        expected += Fraction(overage(tiers[since], before + used) - overage(tiers[since], before))
        before += used
    assert total(windows) == total(shuffled) == base_units(expected, 6)


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
    assert november.api_tiers["startup"].monthly_fee == 50
    assert december.label == "2026-12-01T00:00:00Z" and book.version_labelled(december.label) is december
    with pytest.raises(LookupError):
        book.version_at(datetime(2025, 1, 1, tzinfo=UTC))


def test_versions_and_demand_steps_take_effect_on_a_whole_second() -> None:
    text = """name: n
versions:
  - effective_from: "2026-01-01T00:00:00.5Z"
"""
    with pytest.raises(PriceBookError, match="whole second"):
        parse_price_book(text)


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


def test_a_price_has_at_most_28_significant_digits_and_18_places() -> None:
    """Bounds that keep every amount within the meter's exact arithmetic (docs/PRICING.md)."""
    text = """
name: long
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    storage_per_gb_month: {bucket: "0.12345678901234567890123456789"}
"""
    with pytest.raises(PriceBookError, match="at most 28 significant digits"):
        parse_price_book(text)
    with pytest.raises(PriceBookError, match="at most 18 decimal places"):
        parse_price_book(text.replace('789"', '78"'))  # 28 digits, but 29 places
    assert parse_price_book(text.replace('"0.12345678901234567890123456789"', '"0.123456789012345678"'))


def test_yaml_numbers_are_read_exactly() -> None:
    book = parse_price_book("""name: n
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    storage_per_gb_month: {bucket: 0.01}
""")
    assert book.versions[0].storage_per_gb_month["bucket"] == Decimal("0.01")
