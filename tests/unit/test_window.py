"""Window core: closing on the watermark, grace, adjustments, horizon, quotas, and restarts."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.rating import to_base_units
from agents.window import (
    OPEN,
    SESSION,
    WATERMARK,
    AccountPlan,
    Tally,
    TooLateError,
    UnpricedError,
    WindowConfig,
    WindowResult,
    Windows,
)
from schemas.charges import Charge, charge_id
from schemas.events import ApiRequestEvent, GpuUsageEvent, UsageEvent, event_decoder
from schemas.pricebook import load_price_book, parse_price_book

BOOK = load_price_book(Path(__file__).resolve().parents[2] / "schemas" / "pricebooks" / "default.yaml")
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a window start (minute boundary)
CONFIG = WindowConfig(size=60, grace=300, horizon=35 * 86_400)
RATED_AT = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
PLANS = {"acct-api": AccountPlan(BOOK, "startup"), "acct-ent": AccountPlan(BOOK, None, "enterprise")}
_tally = msgspec.msgpack.Decoder(Tally)


def plan_of(account: str) -> AccountPlan:
    return PLANS.get(account, AccountPlan(BOOK))


def event(kind: str, at: datetime, account: str = "acct-1", serial: int = 0, **data: Any) -> UsageEvent:
    payloads: dict[str, dict[str, Any]] = {
        "gpu.usage.v1": {
            "session_id": "s1",
            "provider_id": "prov-1",
            "node_id": "n1",
            "gpu_model": "rtx_4090",
            "vram_total_gb": "24",
            "vram_allocated_gb": "12",
            "power_watts": "350",
            "utilization": "0.5",
            "interval_seconds": 60,
        },
        "api.request.v1": {"endpoint": "/v1/chat", "request_count": 1},
        "storage.usage.v1": {
            "storage_kind": "bucket",
            "resource_id": "b1",
            "gb": "100",
            "duration_seconds": 3600,
        },
        "session.started.v1": {"session_id": "c1", "resource_tier": "medium"},
        "session.ended.v1": {"session_id": "c1", "duration_seconds": 7200},
    }
    envelope = {
        "specversion": "1.0",
        "id": f"e{serial}",
        "source": "test",
        "type": kind,
        "time": at.isoformat(),
        "subject": account,
        "data": {**payloads[kind], **data},
    }
    return event_decoder.decode(msgspec.json.encode(envelope))  # validated, as ingest accepts it


class Partition:
    """A window core over a dict store that commits like the meter: changes applied per close."""

    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.charges: list[Charge] = []
        self.windows = self.reopen()

    def reopen(self) -> Windows:
        """What a restarted worker builds from the committed state."""
        open_windows = [(k, v) for k, v in self.store.items() if k.startswith(OPEN)]
        watermark = int(self.store.get(WATERMARK, b"0"))
        self.windows = Windows(CONFIG, plan_of, self.store.get, open_windows, watermark)
        return self.windows

    def commit(self, result: WindowResult) -> WindowResult:
        for key, value in result.changes.items():
            if value:
                self.store[key] = value
            else:
                self.store.pop(key, None)
        self.charges += result.charges
        return result

    def poll(self, *events: UsageEvent, wall_clock: datetime | None = None) -> WindowResult:
        for e in events:
            self.windows.add(e)
        clock = int(wall_clock.timestamp()) if wall_clock else None
        return self.commit(self.windows.close(RATED_AT, clock))

    def total(self, account: str | None = None) -> int:
        return sum(c.amount_base_units for c in self.charges if account in {None, c.account})


def gpu_window_amount(heartbeats: int) -> int:
    """Half a 4090 (0.25/h) plus 350 W (0.35/h) = 0.60/h; a heartbeat bills one minute."""
    return to_base_units(Decimal("0.60") * heartbeats / 60, BOOK.token.decimals)


def test_a_window_closes_when_the_watermark_passes_its_end_plus_grace() -> None:
    p = Partition()
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
    p = Partition()
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


def test_beyond_the_correction_horizon_is_too_late() -> None:
    p = Partition()
    p.poll(event("gpu.usage.v1", T0))
    with pytest.raises(TooLateError):
        p.windows.add(event("gpu.usage.v1", T0 - timedelta(days=35, seconds=1), serial=1))
    p.windows.add(event("gpu.usage.v1", T0 - timedelta(days=34), serial=2))  # within: accepted


def test_unpriced_usage_is_refused_whole() -> None:
    p = Partition()
    with pytest.raises(UnpricedError, match="b200"):
        p.windows.add(event("gpu.usage.v1", T0, gpu_model="b200"))
    with pytest.raises(UnpricedError, match="tape"):
        p.windows.add(event("storage.usage.v1", T0, storage_kind="tape"))
    assert p.windows.open == {}
    # An API request of an account without a tier, for no priced product: usage, not charged.
    p.windows.add(event("api.request.v1", T0, product_id="unlisted"))
    assert p.windows.open == {} and p.poll(wall_clock=T0 + timedelta(hours=1)).charges == []


def test_idle_partition_closes_by_the_wall_clock() -> None:
    p = Partition()
    p.poll(event("storage.usage.v1", T0))
    assert p.poll(wall_clock=T0 + timedelta(minutes=5)).charges == []
    [charge] = p.poll(wall_clock=T0 + timedelta(minutes=6)).charges
    # 100 GB for one hour at 0.02 per GB-month of 720 h.
    assert charge.amount_base_units == to_base_units(Decimal("100") * Decimal("0.02") / 720, 6) == 2_778
    assert p.windows.open == {}
    assert not any(k.startswith(OPEN) for k in p.store)


def test_api_quota_and_fee_per_period_across_windows() -> None:
    """Seed 004: 12,000 requests on startup in one month -> 50 fee + 2,000 x 0.01 = 70 USDC."""
    p = Partition()
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
    steady = Partition()
    for e in events:
        steady.poll(e)
    steady.poll(wall_clock=T0 + timedelta(hours=2))
    return steady


def test_state_survives_a_restart_between_any_two_polls() -> None:
    events = [event("gpu.usage.v1", T0 + timedelta(seconds=17 * i), serial=i) for i in range(60)]
    steady = steady_run(events)
    restarted = Partition()
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
    restarted = Partition()
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


def oracle(events: list[UsageEvent]) -> int:
    """Rated independently of windows' closing order: each GPU window's exact total rounded once,
    each product's period total priced once (the module's telescoping rule)."""
    gpu: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    tokens: Decimal = Decimal(0)
    for e in events:
        if isinstance(e, GpuUsageEvent):
            gpu[(e.subject, int(e.time.timestamp()) // 60)] += Decimal("0.60") / 60
        elif isinstance(e, ApiRequestEvent):
            tokens += e.data.tokens_in + e.data.tokens_out
    total = sum(to_base_units(amount, 6) for amount in gpu.values())
    return total + to_base_units(max(Decimal(0), tokens - 1000) * Decimal("0.0015"), 6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3_600), st.booleans(), st.integers(0, 500)), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
    st.integers(1, 8),
)
def test_totals_do_not_depend_on_arrival_order_or_polls(
    spec: list[tuple[int, bool, int]], rng: Any, poll_size: int
) -> None:
    """Whatever the order (so whatever is late, adjusted or within grace) and however events
    fall into polls, the charges add up to the oracle, to the base unit."""
    events = [
        event("gpu.usage.v1", T0 + timedelta(seconds=s), serial=i)
        if is_gpu
        else event("api.request.v1", T0 + timedelta(seconds=s), serial=i, product_id="claude-3", tokens_in=n)
        for i, (s, is_gpu, n) in enumerate(spec)
    ]
    rng.shuffle(events)
    p = Partition()
    for start in range(0, len(events), poll_size):
        p.poll(*events[start : start + poll_size])
    p.poll(wall_clock=T0 + timedelta(hours=3))
    assert p.total() == oracle(events)
    assert all(c.amount_base_units >= 0 for c in p.charges)
    assert len({c.charge_id for c in p.charges}) == len(p.charges)


def test_demand_schedule_multiplies_gpu_windows_from_its_start() -> None:
    text = """
name: peak
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {h100: "4.00"}
      power_rate_per_watt_hour: "0"
      demand_schedule:
        - {effective_from: "2026-11-24T12:01:00Z", multiplier: "1.5"}
        - {effective_from: "2026-11-24T12:02:00Z", multiplier: "2", gpu_models: [a100]}
"""
    PLANS["acct-peak"] = AccountPlan(parse_price_book(text))
    p = Partition()
    for minute in range(3):
        p.windows.add(
            event(
                "gpu.usage.v1",
                T0 + timedelta(minutes=minute),
                "acct-peak",
                minute,
                gpu_model="h100",
                vram_total_gb="80",
                vram_allocated_gb="80",
            )
        )
    p.poll(wall_clock=T0 + timedelta(hours=1))
    amounts = [c.amount_base_units for c in sorted(p.charges, key=lambda c: c.window_start)]
    # 4.00/h for a minute = 66,667; x1.5 from 12:01 = 100,000; the a100-only step leaves h100 at 1.5.
    assert amounts == [66_667, 100_000, 100_000]


def test_a_volume_price_that_falls_is_never_refunded() -> None:
    text = """
name: volume
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    products:
      bulk: {pricing: {model: tiered_volume, tiers: [{up_to: "100", unit_price: "1"}, {unit_price: "0.5"}]}}
"""
    PLANS["acct-bulk"] = AccountPlan(parse_price_book(text))
    p = Partition()
    p.poll(event("api.request.v1", T0, "acct-bulk", 0, product_id="bulk", tokens_in=100))
    p.poll(
        event("api.request.v1", T0 + timedelta(minutes=1), "acct-bulk", 1, product_id="bulk", tokens_in=20)
    )
    p.poll(wall_clock=T0 + timedelta(hours=1))
    # 100 units at 1 = 100; at 120 units the whole period costs 60: the second window charges 0.
    assert [c.amount_base_units for c in sorted(p.charges, key=lambda c: c.window_start)] == [100_000_000, 0]


def test_a_providers_minimum_rate_floors_its_heartbeats() -> None:
    text = """
name: floors
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {rtx_4090: "0.50"}
      power_rate_per_watt_hour: "0"
      provider_minimum_per_hour: {prov-1: "1.20"}
"""
    PLANS["acct-floor"] = AccountPlan(parse_price_book(text))
    p = Partition()
    p.windows.add(event("gpu.usage.v1", T0, "acct-floor", 0, vram_allocated_gb="6"))  # 0.125/h -> 1.20
    p.windows.add(event("gpu.usage.v1", T0, "acct-floor", 1, vram_allocated_gb="6", provider_id="prov-2"))
    p.poll(wall_clock=T0 + timedelta(hours=1))
    by_provider = {c.provider_id: c.amount_base_units for c in p.charges}
    assert by_provider == {"prov-1": 20_000, "prov-2": 2_083}  # 1.20/60 and 0.125/60 USDC


@pytest.mark.parametrize("end_first", [False, True])
def test_a_compute_session_is_charged_once_both_ends_are_seen(end_first: bool) -> None:
    """Seed 002: 2 h of a medium session for an enterprise user at 0.015/h = 0.03, in the end's
    window, whichever end comes first, across a restart in between."""
    p = Partition()
    start = event("session.started.v1", T0, "acct-ent", 1)
    end = event("session.ended.v1", T0 + timedelta(hours=2), "acct-ent", 2)
    first, second = (end, start) if end_first else (start, end)
    p.poll(first)
    assert p.charges == [] and any(k.startswith(SESSION) for k in p.store)  # one end waits in state
    p.reopen()  # a restart between the two ends
    p.poll(second, wall_clock=T0 + timedelta(hours=3))
    [charge] = p.charges
    assert (charge.meter, charge.amount_base_units, charge.unit) == ("compute:medium", 30_000, "hour")
    assert charge.quantity == "2" and charge.window_start == T0 + timedelta(hours=2)
    assert not any(k.startswith(SESSION) for k in p.store)  # joined: gone from the state


def test_sessions_without_a_user_type_or_with_an_unknown_tier() -> None:
    p = Partition()
    p.poll(event("session.started.v1", T0, "acct-1", 1), event("session.ended.v1", T0, "acct-1", 2))
    assert p.poll(wall_clock=T0 + timedelta(hours=1)).charges == []  # no user type: usage only
    with pytest.raises(UnpricedError, match="quantum"):
        p.windows.add(event("session.started.v1", T0, "acct-ent", 3, resource_tier="quantum"))


def test_interleaved_accounts_on_different_books_each_get_their_books_price() -> None:
    """Interleaved accounts on different books, a book whose version changes between windows:
    each window is rated at its own book's version, whatever order accounts and windows come in."""
    text = """
name: cheap
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu: {base_rate_per_hour: {rtx_4090: "0.10"}, power_rate_per_watt_hour: "0"}
  - effective_from: "2026-11-24T12:01:00Z"
    gpu: {base_rate_per_hour: {rtx_4090: "0.20"}, power_rate_per_watt_hour: "0"}
"""
    PLANS["acct-cheap"] = AccountPlan(parse_price_book(text))
    p = Partition()
    accounts = ["acct-cheap", "acct-1", "acct-1", "acct-cheap"]
    heartbeats = [
        event("gpu.usage.v1", T0 + timedelta(minutes=minute, seconds=serial), account, 10 * minute + serial)
        for minute in (0, 1)  # the books alternate within a window, and "cheap" spans two
        for serial, account in enumerate(accounts)
    ]
    p.poll(*heartbeats, wall_clock=T0 + timedelta(hours=1))
    charged = {(c.account, c.window_start, c.price_version) for c in p.charges}
    amounts = {(c.account, c.window_start): c.amount_base_units for c in p.charges}
    start = T0 + timedelta(minutes=1)
    # The default book: 0.60/h per heartbeat minute. "cheap": half a 4090 at 0.10/h, then 0.20/h.
    assert amounts == {
        ("acct-1", T0): gpu_window_amount(2),
        ("acct-1", start): gpu_window_amount(2),
        ("acct-cheap", T0): to_base_units(Decimal("0.05") * 2 / 60, BOOK.token.decimals),
        ("acct-cheap", start): to_base_units(Decimal("0.10") * 2 / 60, BOOK.token.decimals),
    }
    assert ("acct-cheap", start, "2026-11-24T12:01:00Z") in charged
    assert ("acct-cheap", T0, "2026-01-01T00:00:00Z") in charged


def test_names_of_closed_windows_are_let_go_and_open_windows_keep_their_state() -> None:
    """The native core interns accounts and dimensions; once the table has piled up past the
    live windows' names (100,000 here), a poll's start drops the rest, and the open windows read
    back, and go on adding, exactly as before."""
    p = Partition()
    for serial in range(101_000):  # a burst of accounts seen once, all in one window
        p.windows.add(event("storage.usage.v1", T0, f"burst-{serial}", serial))
    p.poll(wall_clock=T0 + timedelta(hours=1))  # all of them closed and rated
    assert len(p.charges) == 101_000
    later = T0 + timedelta(hours=2)
    p.poll(*(event("gpu.usage.v1", later, f"acct-{i}", 200_000 + i) for i in range(3)))
    before = sorted(p.windows.core.open_windows())
    held = p.windows.core.interned
    p.windows.core.begin_poll()
    assert p.windows.core.interned < held - 100_000 and sorted(p.windows.core.open_windows()) == before
    p.poll(event("gpu.usage.v1", later + timedelta(seconds=1), "acct-0", 300_000))
    p.poll(wall_clock=later + timedelta(hours=1))
    gpu = {c.account: c.amount_base_units for c in p.charges if c.meter == "gpu"}
    assert gpu == {
        "acct-0": gpu_window_amount(2),
        "acct-1": gpu_window_amount(1),
        "acct-2": gpu_window_amount(1),
    }
