"""Window core: closing on the watermark, grace, adjustments, horizon, restarts, interning.

The pricing rules themselves (versions and plans by event time, period-exact rounding, sessions,
failed requests, operator changes) are tests/unit/test_pricing_rules.py's.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from uuid import UUID

import msgspec
import pytest

from agents.plans import AccountPlan
from agents.rating import base_units
from agents.window import TooLateError, UnpricedError
from agents.window_state import (
    CLOSED,
    OPEN,
    Tally,
    closed_revision,
    decode_key,
    state_key,
)
from schemas.charges import charge_id
from schemas.events import UsageEvent
from tests.unit.windows_support import BOOK, RATED_AT, T0, Partition, event

OPEN_START_T0 = msgspec.msgpack.encode(int(T0.timestamp()))  # a window key ends with its start

PLANS: dict[str, AccountPlan] = {
    "acct-api": AccountPlan(BOOK, "startup"),
    "acct-ent": AccountPlan(BOOK, None, "enterprise"),
}
_tally = msgspec.msgpack.Decoder(Tally)


def gpu_window_amount(heartbeats: int) -> int:
    """Half a 4090 (0.25/h) plus 350 W (0.35/h) = 0.60/h; a heartbeat is one minute."""
    return base_units(Decimal("0.60") * heartbeats / 60, BOOK.token.decimals)


def test_a_window_closes_when_the_watermark_passes_its_end_plus_grace() -> None:
    p = Partition(PLANS)
    result = p.poll(
        event("gpu.usage.v1", T0 + timedelta(seconds=10)),
        event("gpu.usage.v1", T0 + timedelta(seconds=50), serial=1),
    )
    assert result.charges == [] and len(p.windows.open) == 1  # open: nothing rated yet
    # 5 min 59 s after the window's end: still within grace.
    p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=60 + 299), serial=2))
    assert p.charges == []
    result = p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=60 + 300), serial=3))
    [charge] = result.charges
    assert charge.window_start == T0 and charge.revision == 0 and charge.meter == "gpu"
    assert charge.amount_base_units == gpu_window_amount(2) == 20_000  # 0.60/h x 2 min
    assert charge.quantity == str(Decimal(2) / 60) and charge.provider_id == "prov-1"
    assert charge.platform_fee_base_units == 1_000  # 5 %
    assert charge.charge_id == charge_id("acct-1", "gpu", charge.dimensions, T0, 0)
    assert charge.rated_at == RATED_AT


def test_an_event_within_grace_joins_its_open_window_and_a_later_one_is_an_adjustment() -> None:
    p = Partition(PLANS)
    p.poll(event("gpu.usage.v1", T0), event("gpu.usage.v1", T0 + timedelta(minutes=3), serial=1))
    p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=30), serial=2))  # late, within grace
    p.poll(event("gpu.usage.v1", T0 + timedelta(minutes=20), serial=3))  # closes T0's window
    first = [c for c in p.charges if c.window_start == T0]
    assert [(c.revision, c.amount_base_units) for c in first] == [(0, gpu_window_amount(2))]
    # Later than the grace: the next revision of the window, for the difference only.
    result = p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=40), serial=4))
    assert result.adjustments == 1
    [adjustment] = result.charges
    assert adjustment.window_start == T0 and adjustment.revision == 1
    assert adjustment.charge_id != first[0].charge_id
    assert adjustment.amount_base_units == gpu_window_amount(3) - gpu_window_amount(2)
    # A second adjustment in one poll of two late events: one revision for both.
    result = p.poll(
        event("gpu.usage.v1", T0 + timedelta(seconds=41), serial=5),
        event("gpu.usage.v1", T0 + timedelta(seconds=42), serial=6),
    )
    assert [(c.revision, c.amount_base_units) for c in result.charges] == [
        (2, gpu_window_amount(5) - gpu_window_amount(3))
    ]


def test_a_window_keeps_its_last_adjustment_and_reads_the_former_format() -> None:
    """A close writes no record of its revision (0); an adjustment keeps its own, the next one
    counts on from it. Closed windows were kept as their whole Tally: a store written so still
    gives a late event the window's next revision (a new charge id, never a repeated one)."""
    p = Partition(PLANS)
    p.poll(event("gpu.usage.v1", T0), event("gpu.usage.v1", T0 + timedelta(minutes=20), serial=1))
    closed_key = CLOSED + next(k for k in p.results[0].changes if k.endswith(OPEN_START_T0))[len(OPEN) :]
    assert closed_key not in p.store and closed_revision(None) == 0
    [adjustment] = p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=40), serial=2)).charges
    assert adjustment.window_start == T0 and adjustment.revision == 1
    assert closed_revision(p.store[closed_key]) == 1
    p.store[closed_key] = msgspec.msgpack.encode(
        Tally(1, Decimal("0.5"), "hour", "v1", revision=3, charged=7)
    )
    p.reopen()
    [adjustment] = p.poll(event("gpu.usage.v1", T0 + timedelta(seconds=41), serial=3)).charges
    assert adjustment.window_start == T0 and adjustment.revision == 4
    assert closed_revision(p.store[closed_key]) == 4


def test_the_native_cores_window_keys_are_the_ones_python_encodes() -> None:
    """Closing re-prefixes the core's open keys (``CLOSED`` + the rest): the same bytes as encoded."""
    p = Partition(PLANS)
    p.poll(
        event("gpu.usage.v1", T0),
        event("api.request.v1", T0, "acct-api", serial=1),
        event("storage.usage.v1", T0, serial=2),
    )
    raw_keys = [raw for raw, _ in p.windows.core.open_windows()]
    assert len(raw_keys) == 3
    for raw in raw_keys:
        assert state_key(OPEN, decode_key(raw)) == raw


def test_beyond_the_correction_horizon_is_too_late() -> None:
    p = Partition(PLANS)
    p.poll(event("gpu.usage.v1", T0))
    with pytest.raises(TooLateError):
        p.windows.add(event("gpu.usage.v1", T0 - timedelta(days=35, seconds=1), serial=1))
    p.windows.add(event("gpu.usage.v1", T0 - timedelta(days=34), serial=2))  # within: accepted


def test_unpriced_usage_is_refused_whole() -> None:
    p = Partition(PLANS)
    with pytest.raises(UnpricedError, match="b200"):
        p.windows.add(event("gpu.usage.v1", T0, gpu_model="b200"))
    with pytest.raises(UnpricedError, match="tape"):
        p.windows.add(event("storage.usage.v1", T0, storage_kind="tape"))
    assert p.windows.open == {}
    # An API request of an account without a tier, for no priced product: usage, not charged.
    p.windows.add(event("api.request.v1", T0, product_id="unlisted"))
    assert p.windows.open == {} and p.poll(wall_clock=T0 + timedelta(hours=1)).charges == []


def test_idle_partition_closes_by_the_wall_clock() -> None:
    p = Partition(PLANS)
    p.poll(event("storage.usage.v1", T0))
    assert p.poll(wall_clock=T0 + timedelta(minutes=5)).charges == []
    [charge] = p.poll(wall_clock=T0 + timedelta(minutes=6)).charges
    # 100 GB for one hour at 0.02 per GB-month of 720 h.
    assert charge.amount_base_units == base_units(Decimal("100") * Decimal("0.02") / 720, 6) == 2_778
    assert p.windows.open == {}
    assert not any(k.startswith(OPEN) for k in p.store)


def test_api_quota_and_fee_per_period_across_windows() -> None:
    """API tiers: 12,000 requests on startup in one month -> 50 fee + 2,000 x 0.01 = 70 USDC."""
    p = Partition(PLANS)
    for minute in range(12):  # 1,000 requests a minute, in 12 windows
        p.poll(
            event("api.request.v1", T0 + timedelta(minutes=minute), "acct-api", minute, request_count=1_000)
        )
    p.poll(wall_clock=T0 + timedelta(hours=1))
    by_meter: dict[str, int] = defaultdict(int)
    for c in p.charges:
        by_meter[c.meter] += c.amount_base_units
    assert by_meter == {"api_fee": 50_000_000, "api_overage": 20_000_000}
    assert sum(c.meter == "api_fee" for c in p.charges) == 1  # once per period
    assert len([c for c in p.charges if c.meter == "api_overage"]) == 12  # a line per window


def steady_run(events: list[UsageEvent]) -> Partition:
    """Every event polled by one partition that never restarts, then closed by the wall clock."""
    steady = Partition(PLANS)
    for e in events:
        steady.poll(e)
    steady.poll(wall_clock=T0 + timedelta(hours=2))
    return steady


def test_state_survives_a_restart_between_any_two_polls() -> None:
    events = [event("gpu.usage.v1", T0 + timedelta(seconds=17 * i), serial=i) for i in range(60)]
    steady = steady_run(events)
    restarted = Partition(PLANS)
    for i, e in enumerate(events):
        if i % 7 == 0:
            restarted.reopen()  # a crash after the commit: rebuilt from the store alone
        restarted.poll(e)
    restarted.reopen()
    restarted.poll(wall_clock=T0 + timedelta(hours=2))
    assert restarted.total() == steady.total() > 0
    assert sorted(c.charge_id for c in restarted.charges) == sorted(c.charge_id for c in steady.charges)


def test_counted_meters_sum_whole_numbers_through_a_restart() -> None:
    """Requests and tokens are summed as ints (cheaper than Decimal) and stored as such; a restart
    mid-window reads them back as ints, and every charge is the one a steady run makes."""
    events = [
        event(
            "api.request.v1",
            T0 + timedelta(seconds=7 * i),
            "acct-api",
            i,
            request_count=3,
            product_id="gpt-4",
            tokens_in=100 + i,
            tokens_out=i,
        )
        for i in range(40)
    ]
    steady = steady_run(events)
    restarted = Partition(PLANS)
    for i, e in enumerate(events):
        if i % 5 == 4:
            windows = restarted.reopen()
            assert windows.open, "the restart lands inside open windows"
            assert all(type(tally.quantity) is int for tally in windows.open.values())
        restarted.poll(e)
    restarted.poll(wall_clock=T0 + timedelta(hours=2))

    def lines(p: Partition) -> list[tuple[UUID, str, str, int]]:
        return sorted((c.charge_id, c.quantity, c.unit_price, c.amount_base_units) for c in p.charges)

    assert lines(restarted) == lines(steady)
    overage = [c for c in steady.charges if c.meter == "api_overage"]
    assert sum(int(c.quantity) for c in overage) == 3 * 40  # whole numbers, printed as such
    assert sum(Decimal(c.quantity) for c in steady.charges if c.meter == "product:gpt-4") == sum(
        100 + 2 * i for i in range(40)
    )


def test_names_of_closed_windows_are_let_go_and_open_windows_keep_their_state() -> None:
    """The native core interns accounts and dimensions; once the table has piled up past the
    live windows' names (100,000 here), a poll's start drops the rest, and the open windows read
    back, and go on adding, exactly as before."""
    p = Partition(PLANS)
    burst = [event("storage.usage.v1", T0, f"burst-{serial}", serial) for serial in range(101_000)]
    p.poll(*burst, wall_clock=T0 + timedelta(hours=1))  # accounts seen once, closed and rated
    assert len(p.charges) == 101_000
    later = T0 + timedelta(hours=2)
    for i in range(3):
        p.windows.add(event("gpu.usage.v1", later, f"acct-{i}", 200_000 + i))
    before = sorted(p.windows.core.open_windows())
    held = p.windows.core.interned
    p.windows.core.begin_poll(p.plans.generation)
    assert p.windows.core.interned < held - 100_000 and sorted(p.windows.core.open_windows()) == before
    p.poll(event("gpu.usage.v1", later + timedelta(seconds=1), "acct-0", 300_000))
    p.poll(wall_clock=later + timedelta(hours=1))
    gpu = {c.account: c.amount_base_units for c in p.charges if c.meter == "gpu"}
    assert gpu == {
        "acct-0": gpu_window_amount(2),
        "acct-1": gpu_window_amount(1),
        "acct-2": gpu_window_amount(1),
    }
