"""docs/PRICING.md's rules, each on the window core in-process: the amount due is written here
from the rule (the arithmetic in the comments), never read back from the code.

Book ``rules``: version 1 from 2026-01-01, version 2 from 12:37:30 on T0's day (T0 = 12:00).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from agents.plans import AccountPlan
from agents.rating import base_units
from agents.window import SessionConflictError, UnpricedError
from schemas.charges import charges_decoder, charges_encoder
from schemas.events import UsageEvent, event_decoder
from tests.unit.windows_support import T0, Partition, book, event, history

RULES = book("""
name: rules
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {rtx_4090: "0.50", a100: "2.00"}
      power_rate_per_watt_hour: "0.001"
      provider_minimum_per_hour: {prov-min: "1.20"}
    api_tiers:
      startup: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}
      growth: {monthly_fee: "250", included_requests: 100000, overage_per_request: "0.005"}
      lenient: {monthly_fee: "10", included_requests: 0, overage_per_request: "0.01", charge_failed: true}
      part_a: {monthly_fee: "30", included_requests: 0, overage_per_request: "0", fee_proration: prorated}
      part_b: {monthly_fee: "60", included_requests: 0, overage_per_request: "0", fee_proration: prorated}
    products:
      gpt-4: {unit: token, pricing: {model: per_unit, unit_price: "0.002"}}
      drop: {pricing: {model: per_unit, unit_price: "0.01"}}
      claude-3: {unit: token, pricing: {model: per_unit, unit_price: "0.0015", included: "1000"}}
      bulk: {pricing: {model: tiered_volume, tiers: [{up_to: "100", unit_price: "1"}, {unit_price: "0.5"}]}}
    compute_per_hour: {enterprise: {medium: "0.015"}}
    storage_per_gb_month: {bucket: "0.02"}
  - effective_from: "2026-11-24T12:37:30Z"
    gpu:
      base_rate_per_hour: {rtx_4090: "1.00", a100: "2.00"}
      power_rate_per_watt_hour: "0.001"
    api_tiers:
      startup: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.02"}
      growth: {monthly_fee: "250", included_requests: 100000, overage_per_request: "0.005"}
    products:
      gpt-4: {unit: token, pricing: {model: per_unit, unit_price: "0.004"}}
      drop: {pricing: {model: per_unit, unit_price: "0.001"}}
    compute_per_hour: {enterprise: {medium: "0.03"}}
    storage_per_gb_month: {bucket: "0.02"}
""")
V2 = T0.replace(minute=37, second=30)
USDC = 1_000_000  # base units per USDC


def units(amount: str) -> int:
    return base_units(Decimal(amount), 6)


def plan(tier: str | None = None, user_type: str | None = None) -> AccountPlan:
    return AccountPlan(RULES, tier, user_type)


def full_card(at: datetime, serial: int, session: str = "s", seconds: int = 60, **data: object) -> UsageEvent:
    """A whole rtx_4090 (24 of 24 GB) drawing no power: its base rate, per hour."""
    return event(
        "gpu.usage.v1",
        at,
        "acct-gpu",
        serial,
        session_id=session,
        vram_allocated_gb="24",
        power_watts="0",
        interval_seconds=seconds,
        **data,
    )


# 1. Prices by event time ----------------------------------------------------------------------


def test_a_price_change_mid_period_prices_each_unit_at_its_own_time() -> None:
    p = Partition({a: plan("startup") for a in ("acct-api", "acct-gpt", "acct-drop")})
    p.poll(
        event("api.request.v1", T0.replace(minute=29), "acct-api", 1, request_count=12_000),
        event(
            "api.request.v1",
            T0.replace(minute=29),
            "acct-gpt",
            2,
            request_count=0,
            product_id="gpt-4",
            tokens_in=1000,
        ),
        event(
            "api.request.v1",
            T0.replace(minute=29),
            "acct-drop",
            3,
            request_count=0,
            product_id="drop",
            tokens_in=1000,
        ),
    )
    p.poll(
        event("api.request.v1", T0.replace(minute=42), "acct-api", 4, request_count=1),
        event(
            "api.request.v1",
            T0.replace(minute=42),
            "acct-gpt",
            5,
            request_count=0,
            product_id="gpt-4",
            tokens_in=1,
        ),
        event(
            "api.request.v1",
            T0.replace(minute=42),
            "acct-drop",
            6,
            request_count=0,
            product_id="drop",
            tokens_in=1000,
        ),
    )
    p.finish()
    overage = sorted(
        (c.window_start, c.amount_base_units)
        for c in p.charges
        if c.account == "acct-api" and c.meter == "api_overage"
    )
    # 2,000 over the quota at 0.01 = 20; the 12,001st request at version 2's 0.02.
    assert overage == [(T0.replace(minute=29), units("20")), (T0.replace(minute=42), units("0.02"))]
    assert p.meters("acct-api") == {"api_fee": 50 * USDC, "api_overage": units("20.02")}
    # 1,000 tokens at 0.002, then one at 0.004; 1,000 units at 0.01, then 1,000 at 0.001.
    assert p.total("acct-gpt") == units("2") + units("0.004")
    assert p.total("acct-drop") == units("10") + units("1")


def test_a_heartbeat_is_priced_by_the_version_at_its_own_time() -> None:
    p = Partition()
    p.plans.default = plan()
    p.poll(full_card(V2.replace(second=10), 1, "a"), full_card(V2.replace(second=40), 2, "b"))
    p.finish()
    lines = sorted((c.window_start, c.price_version, c.amount_base_units) for c in p.charges)
    # 12:37:10 at 0.50/h for a minute; 12:37:40 at version 2's 1.00/h, in a window from 12:37:30.
    # One period: 0.5/60 + 1/60 = 0.025 USDC, rounded once.
    assert lines == [
        (V2.replace(second=0), "2026-01-01T00:00:00Z", units("0.008333")),
        (V2, "2026-11-24T12:37:30Z", units("0.025") - units("0.008333")),
    ]


# 2. Plans by event time -------------------------------------------------------------------------


def test_a_downgrade_while_the_window_is_open_charges_both_fees_and_no_overage() -> None:
    switch = T0.replace(minute=30, second=30)
    p = Partition({"acct-down": history((None, plan("growth")), (switch, plan("startup")))})
    p.poll(event("api.request.v1", T0.replace(minute=30, second=10), "acct-down", 1, request_count=50_000))
    p.finish()
    # 50,000 requests inside growth's 100,000; each tier in force this period owes its fee once.
    assert p.meters("acct-down") == {"api_fee": (250 + 50) * USDC, "api_overage": 0}
    assert {c.dimensions["tier"] for c in p.charges if c.meter == "api_fee"} == {"growth", "startup"}
    # A later request on startup counts after the period's 50,000: over startup's quota.
    p.poll(event("api.request.v1", T0.replace(minute=50), "acct-down", 2, request_count=1))
    p.finish()
    assert p.meters("acct-down") == {"api_fee": 300 * USDC, "api_overage": units("0.02")}  # version 2


def test_an_upgrade_while_the_window_is_open_charges_each_fee_once() -> None:
    switch = T0.replace(minute=10, second=30)
    p = Partition({"acct-up": history((None, plan("startup")), (switch, plan("growth")))})
    p.poll(
        event("api.request.v1", T0.replace(minute=10, second=5), "acct-up", 1, request_count=5_000),
        event("api.request.v1", T0.replace(minute=10, second=45), "acct-up", 2, request_count=1),
    )
    p.finish()
    assert p.meters("acct-up") == {"api_fee": (50 + 250) * USDC, "api_overage": 0}
    # The window was cut at the switch: one line per plan, labelled by its tier.
    tiers = sorted((c.window_start, c.dimensions["tier"]) for c in p.charges if c.meter == "api_overage")
    assert tiers == [(T0.replace(minute=10), "startup"), (switch, "growth")]


def test_prorated_fees_follow_the_time_each_tier_was_in_force_even_when_told_late() -> None:
    """November has 30 days: part_a until the 16th (15 days of 30 x 30 = 15), part_b after
    (15 days of 30 x 60 = 30). The switch is recorded after part_a's fee was charged whole."""
    nov = datetime(2026, 11, 1, tzinfo=UTC)
    p = Partition({"acct-pro": plan("part_a")})
    p.poll(event("api.request.v1", nov + timedelta(days=9), "acct-pro", 1))
    p.poll(wall_clock=nov + timedelta(days=9, hours=1))  # its window closes
    assert p.meters("acct-pro")["api_fee"] == 30 * USDC  # in force for the rest of the month
    p.plans.set("acct-pro", history((None, plan("part_a")), (nov + timedelta(days=15), plan("part_b"))))
    p.poll(event("api.request.v1", nov + timedelta(days=19), "acct-pro", 2))
    p.finish()
    fees = sorted(
        (c.dimensions["tier"], c.revision, c.amount_base_units) for c in p.charges if c.meter == "api_fee"
    )
    assert fees == [("part_a", 0, 30 * USDC), ("part_a", 1, -15 * USDC), ("part_b", 0, 30 * USDC)]


# 3. No operator change crashes the meter --------------------------------------------------------


def rules_without(*names: str) -> AccountPlan:
    """The startup plan on the rules book without these API tiers, products and GPU models."""
    data = RULES.model_dump(mode="json")
    for version in data["versions"]:
        for section in ("api_tiers", "products"):
            for name in names:
                version[section].pop(name, None)
        if version["gpu"] is not None:
            for name in names:
                version["gpu"]["base_rate_per_hour"].pop(name, None)
    return AccountPlan(type(RULES).model_validate(data), "startup")


def test_operator_changes_with_windows_open_never_crash_and_lose_nothing() -> None:
    p = Partition({"acct-ops": plan("startup")})
    p.poll(
        event("api.request.v1", T0, "acct-ops", 1, request_count=10_500, product_id="gpt-4", tokens_in=100),
        event(
            "gpu.usage.v1",
            T0,
            "acct-ops",
            3,
            gpu_model="a100",
            vram_total_gb="80",
            vram_allocated_gb="24",
            power_watts="0",
        ),
    )
    # The plan loses its API tier, the book its tier, product and GPU model: windows stay open.
    p.plans.set("acct-ops", rules_without("startup", "gpt-4", "a100"))
    result = p.finish()
    reasons = sorted((r.reason.value, r.detail.split(":")[0]) for r in result.rejected)
    assert [reason for reason, _ in reasons] == ["unpriced", "unpriced"]
    # The GPU window was priced when its heartbeat was accepted (24 of an a100's 80 GB at 2.00/h:
    # 0.60/h for a minute = 0.01); the API and product windows could not be priced any more.
    assert p.meters("acct-ops") == {"gpu": units("0.01")}
    # Replayed once the book is whole again, the dead-lettered usage is charged.
    p.plans.set("acct-ops", plan("startup"))
    p.poll(*(event_decoder.decode(r.original) for r in result.rejected))
    p.finish()
    assert p.meters("acct-ops") == {
        "gpu": units("0.01"),
        "api_fee": 50 * USDC,
        "api_overage": units("5"),  # 500 over the quota at 0.01
        "product:gpt-4": units("0.2"),  # 100 x 0.002
    }


def test_usage_of_a_plan_without_a_usable_book_is_unpriced_and_the_meter_goes_on() -> None:
    p = Partition({"acct-gone": AccountPlan(None, unpriced="price book 'gone' cannot be read")})
    with pytest.raises(UnpricedError, match="gone"):
        p.windows.add(event("api.request.v1", T0, "acct-gone", 1))
    p.poll(event("api.request.v1", T0, "acct-1", 2, product_id="gpt-4", tokens_in=10))
    assert p.finish().charges  # other accounts are rated as ever


# 4. Failed requests -----------------------------------------------------------------------------


def test_failed_requests_are_metered_not_charged_unless_the_book_says_so() -> None:
    p = Partition({"acct-fail": plan("startup"), "acct-lenient": plan("lenient")})
    p.poll(
        event("api.request.v1", T0, "acct-fail", 1, request_count=10_000),
        event("api.request.v1", T0, "acct-fail", 2, request_count=500, status=503),
        event(
            "api.request.v1",
            T0,
            "acct-fail",
            3,
            request_count=0,
            status=500,
            product_id="gpt-4",
            tokens_in=1000,
        ),
        event("api.request.v1", T0, "acct-lenient", 4, request_count=500, status=503),
    )
    p.finish()
    # 10,000 successful requests are within the quota; 503s and a 500's tokens pay nothing.
    assert p.meters("acct-fail") == {"api_fee": 50 * USDC, "api_overage": 0}
    # A tier with charge_failed: the 503s count: 500 x 0.01 = 5.
    assert p.meters("acct-lenient") == {"api_fee": 10 * USDC, "api_overage": 5 * USDC}


# 5. Rounding once per period --------------------------------------------------------------------


@pytest.mark.parametrize(("gb", "due"), [("1", "0.02"), ("3", "0.06"), ("10", "0.2")])
def test_storage_reported_every_minute_for_a_month_costs_its_gb_months(gb: str, due: str) -> None:
    """November is 30 days: gb GB for 43,200 minutes is gb GB-months at 0.02."""
    nov = datetime(2026, 11, 1, tzinfo=UTC)
    p = Partition()
    p.plans.default = plan()
    held = [
        event("storage.usage.v1", nov + timedelta(minutes=m), "acct-store", m, gb=gb, duration_seconds=60)
        for m in range(43_200)
    ]
    for start in range(0, len(held), 5_000):
        p.poll(*held[start : start + 5_000])
    p.finish()
    assert p.total("acct-store") == units(due)
    assert len(p.charges) == 43_200  # a line per window, adding up to the period's total


def test_an_hour_of_a_card_in_minute_windows_costs_its_hourly_rate() -> None:
    p = Partition()
    p.plans.default = plan()
    p.poll(*(full_card(T0 - timedelta(hours=2, minutes=-m), m) for m in range(60)))
    p.finish()
    assert p.total("acct-gpu") == units("0.50")  # not 60 x round(0.008333...) = 0.499980


# 6. GPU sessions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intervals", "due"),
    [
        ([20, 20, 20], "0.008333"),  # 60 s: one minute at 0.50/h
        ([30] * 6, "0.025"),  # 3 minutes
        ([20], "0.008333"),  # shorter than the 1-minute minimum: the minimum
        ([61], "0.016667"),  # 61 s: rounded up to 2 minutes
    ],
)
def test_a_gpu_session_is_rounded_up_once_at_its_end(intervals: list[int], due: str) -> None:
    p = Partition()
    p.plans.default = plan()
    at = T0
    beats = []
    for serial, seconds in enumerate(intervals):
        beats.append(full_card(at, serial, seconds=seconds))
        at += timedelta(seconds=seconds)
    p.poll(*beats)
    p.poll(event("session.ended.v1", at, "acct-gpu", 99, session_id="s", duration_seconds=None))
    p.finish()
    assert p.total("acct-gpu") == units(due)


def test_an_idle_session_ends_by_itself_and_a_late_heartbeat_rounds_it_again() -> None:
    p = Partition()
    p.plans.default = plan()
    p.poll(full_card(T0, 1, seconds=20))
    p.poll(full_card(T0 + timedelta(minutes=10), 2, "other"))  # the watermark passes the idle timeout
    assert p.total("acct-gpu") == units("0.008333")  # ended: the 1-minute minimum
    p.poll(full_card(T0 + timedelta(seconds=20), 3, seconds=50))  # late: the session ran 70 s
    p.finish()
    # 70 s rounds up to 2 minutes of "s", plus "other"'s minute: 3 minutes at 0.50/h.
    assert p.total("acct-gpu") == units("0.025")


def test_a_late_cheaper_heartbeat_can_make_a_credit() -> None:
    """50 s of a whole a100 (2.00/h), ended, rounded up to a minute at that rate; then 10 s of an
    earlier heartbeat of a quarter a100 (0.50/h) arrive: the session is 60 s of actual use,
    nothing to round, so the rounding is withdrawn and the total falls."""
    p = Partition()
    p.plans.default = plan()
    whole = {"gpu_model": "a100", "vram_total_gb": "80", "vram_allocated_gb": "80", "power_watts": "0"}
    p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=10), "acct-gpu", 1, interval_seconds=50, **whole))
    p.poll(
        event(
            "session.ended.v1",
            T0 + timedelta(minutes=1),
            "acct-gpu",
            2,
            session_id="s1",
            duration_seconds=None,
        )
    )
    p.finish()
    assert p.total("acct-gpu") == units("0.033333")  # a minute at 2.00/h
    quarter = {**whole, "vram_allocated_gb": "20"}  # 0.50/h
    p.poll(event("gpu.usage.v1", T0, "acct-gpu", 3, interval_seconds=10, **quarter))
    p.finish()
    # 50 s at 2.00/h + 10 s at 0.50/h = 0.027778 + 0.001389 = 0.029167 (exact 0.0291666...).
    assert p.total("acct-gpu") == units("0.029167")
    assert min(c.amount_base_units for c in p.charges) < 0  # the credit


def test_a_provider_minimum_floors_the_hourly_rate() -> None:
    p = Partition()
    p.plans.default = plan()
    p.poll(
        *(
            event(
                "gpu.usage.v1",
                T0 - timedelta(hours=2, minutes=-m),  # before version 2, which has no floor
                "acct-gpu",
                m,
                vram_allocated_gb="6",
                power_watts="0",
                provider_id="prov-min",
            )
            for m in range(60)
        )
    )
    p.finish()
    assert p.total("acct-gpu") == units("1.20")  # a quarter card is 0.125/h, the floor 1.20/h
    assert sum(c.platform_fee_base_units for c in p.charges) == units("0.06")  # 5% of 1.20, once


# 7. Compute sessions ------------------------------------------------------------------------------


@pytest.mark.parametrize("end_first", [False, True])
def test_a_compute_session_is_priced_over_its_time_whatever_end_comes_first(end_first: bool) -> None:
    """Enterprise medium from 12:00 for 2 h: 12:00-12:37:30 at 0.015/h (2,250 s) and 12:37:30-14:00
    at 0.03/h (4,950 s) = 0.009375 + 0.04125 = 0.050625."""
    p = Partition({"acct-ent": plan(None, "enterprise")})
    start = event("session.started.v1", T0, "acct-ent", 1)
    end = event("session.ended.v1", T0 + timedelta(hours=2), "acct-ent", 2)
    first, second = (end, start) if end_first else (start, end)
    p.poll(first)
    p.reopen()  # a restart between the two ends
    p.poll(second)
    p.finish()
    assert p.total("acct-ent") == units("0.050625")
    labels = sorted(c.price_version for c in p.charges)
    assert labels == ["2026-01-01T00:00:00Z", "2026-11-24T12:37:30Z"]


def test_the_first_start_of_a_session_wins() -> None:
    p = Partition({"acct-ent": plan(None, "enterprise")})
    p.poll(event("session.started.v1", T0, "acct-ent", 1))
    with pytest.raises(SessionConflictError, match="c1"):
        p.windows.add(event("session.started.v1", T0 + timedelta(minutes=19), "acct-ent", 2))
    p.windows.add(event("session.started.v1", T0, "acct-ent", 3))  # the same start again: harmless
    p.poll(event("session.ended.v1", T0 + timedelta(minutes=20), "acct-ent", 4, duration_seconds=None))
    p.finish()
    assert p.total("acct-ent") == units("0.005")  # 20 minutes at 0.015/h


def test_a_session_without_a_user_type_is_usage_only() -> None:
    p = Partition({"acct-none": plan()})
    p.poll(event("session.started.v1", T0, "acct-none", 1), event("session.ended.v1", T0, "acct-none", 2))
    assert p.finish().charges == []


# 8. Credits keep every period exact ---------------------------------------------------------------


def test_a_volume_price_that_falls_is_credited() -> None:
    p = Partition({"acct-bulk": plan()})
    p.poll(event("api.request.v1", T0, "acct-bulk", 1, product_id="bulk", tokens_in=100))
    p.poll(
        event("api.request.v1", T0 + timedelta(minutes=1), "acct-bulk", 2, product_id="bulk", tokens_in=20)
    )
    p.finish()
    # 100 units at 1 = 100; at 120 units the whole period costs 120 x 0.5 = 60: a 40 credit.
    lines = [c.amount_base_units for c in sorted(p.charges, key=lambda c: c.window_start)]
    assert lines == [100 * USDC, -40 * USDC]


def test_a_free_allowance_counts_across_the_period() -> None:
    p = Partition({"acct-claude": plan()})
    p.poll(
        *(
            event(
                "api.request.v1",
                T0 + timedelta(minutes=i),
                "acct-claude",
                i,
                product_id="claude-3",
                tokens_in=n,
            )
            for i, n in enumerate([600, 600, 1600])
        )
    )
    p.finish()
    assert p.total("acct-claude") == units("2.70")  # (2,800 - 1,000) x 0.0015


def test_charges_decode_as_the_ledger_reads_them() -> None:
    p = Partition({"acct-bulk": plan()})
    p.poll(event("api.request.v1", T0, "acct-bulk", 1, product_id="bulk", tokens_in=100))
    p.poll(
        event("api.request.v1", T0 + timedelta(minutes=1), "acct-bulk", 2, product_id="bulk", tokens_in=20)
    )
    p.finish()
    assert charges_decoder.decode(charges_encoder.encode(p.charges)) == p.charges
    assert msgspec.json.decode(charges_encoder.encode(p.charges))[1]["amount_base_units"] < 0


def test_each_unpriced_adjustment_of_a_window_is_a_dead_letter_of_its_own() -> None:
    """A window metered while its product was priced and closed after it left the book, then a
    late event of it the same way: two dead letters of distinct identities, so replaying both
    charges both."""
    p = Partition({"acct-late": plan("startup")})
    letters = []
    for serial, clock in ((1, T0 + timedelta(minutes=10)), (2, None)):
        p.plans.set("acct-late", plan("startup"))
        p.windows.add(event("api.request.v1", T0, "acct-late", serial, product_id="gpt-4", tokens_in=10))
        p.plans.set("acct-late", rules_without("gpt-4"))
        letters += p.poll(wall_clock=clock).rejected
    assert len(letters) == 2 and len({event_decoder.decode(r.original).id for r in letters}) == 2
    p.plans.set("acct-late", plan("startup"))
    p.poll(*(event_decoder.decode(r.original) for r in letters))
    p.finish()
    assert p.meters("acct-late") == {"api_fee": 50 * USDC, "api_overage": 0, "product:gpt-4": units("0.04")}
