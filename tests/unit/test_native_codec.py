"""The native core's arithmetic, time, hashes and state encodings against their Python twins:
decimal (Python's default context), msgspec's datetime and msgpack encodings, aiokafka's
murmur2, xxhash's xxh3-128; and its GPU, storage and compute amounts against the rule in exact
fractions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec
import tally_native
from aiokafka.partitioner import murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.dedupe import decode_marks, encode_marks
from agents.plans import AccountPlan, FixedPlans
from agents.window import WindowConfig, Windows
from agents.window_state import OPEN, Stored, Tally, decode_key, state_key
from pipeline.loadgen import Expected, LoadPlan, generate
from schemas.events import encoder, event_decoder, fingerprint
from schemas.pricebook import parse_price_book
from tests.unit.meter_in_memory import BOOK as DEFAULT_BOOK
from tests.unit.test_native_ingest import DEFAULTS, Record, loadgen_messages, native

_codec = msgspec.msgpack.Encoder()
_tally = msgspec.msgpack.Decoder(Tally)


def decimal_text(coefficient: int, exponent: int) -> str:
    return str(Decimal(coefficient).scaleb(exponent))


decimals = st.builds(decimal_text, st.integers(0, 10**28 - 1), st.integers(-18, 6))


@settings(max_examples=3_000, deadline=None)
@given(decimals, decimals, st.sampled_from(["+", "*", "/"]))
def test_decimal_arithmetic_is_pythons_digit_for_digit(lhs: str, rhs: str, op: str) -> None:
    a, b = Decimal(lhs), Decimal(rhs)
    if op == "/" and b == 0:
        assert tally_native.decimal_op(op, lhs, rhs) is None
        return
    expected = {"+": a + b, "*": a * b, "/": a / b if b else None}[op]
    assert tally_native.decimal_op(op, lhs, rhs) == str(expected)
    assert tally_native.decimal_op("str", lhs, "") == str(a)


def test_decimal_edges() -> None:
    for lhs, rhs in [("10", "24"), ("1", "3"), ("2", "3"), ("0.5", "0.5"), ("1E+5", "3"), ("0E-12", "7")]:
        assert tally_native.decimal_op("/", lhs, rhs) == str(Decimal(lhs) / Decimal(rhs))
    big = "9999999999999999999999999999"  # 28 nines: + 0.5 rounds half-even into 29 digits
    assert tally_native.decimal_op("+", big, "0.5") == str(Decimal(big) + Decimal("0.5"))


moments = st.integers(0, 200 * 365 * 86_400 * 10**6).map(
    lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
)
zones = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@settings(max_examples=1_000, deadline=None)
@given(moments, zones, st.integers(0, 6))
def test_times_read_and_write_as_msgspec_and_isoformat_do(
    moment: datetime, zone: timezone, places: int
) -> None:
    local = moment.astimezone(zone).replace(
        microsecond=moment.microsecond // 10 ** (6 - places) * 10 ** (6 - places)
    )
    text = local.isoformat(timespec="microseconds")
    text = text[: 19 + (places + 1 if places else 0)] + text[26:]  # 0..6 fractional digits
    parsed = msgspec.json.decode(msgspec.json.encode(text), type=datetime).astimezone(UTC)
    assert tally_native.utc_time(text.encode()) == (
        msgspec.json.encode(parsed).decode().strip('"'),
        parsed.isoformat(),
    )


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=70), st.integers(1, 64), st.binary(max_size=300))
def test_routing_and_fingerprints_are_kafkas_and_xxhashs(
    account: bytes, partitions: int, body: bytes
) -> None:
    assert tally_native.route(account, partitions, body) == (
        (murmur2(account) & 0x7FFFFFFF) % partitions,
        fingerprint(body),
    )


BOOK = parse_price_book(
    """
name: edges
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {h100: "4.00", a100: "2.1234567", rtx_4090: "0.50"}
      power_rate_per_watt_hour: "0.00133"
      demand_schedule: [{effective_from: "2026-11-24T11:30:00Z", multiplier: "1.37", gpu_models: [a100]}]
      provider_minimum_per_hour: {prov-min: "3.3333"}
      billing_granularity_seconds: 45
    storage_per_gb_month: {bucket: "0.0234567"}
    compute_per_hour: {pro: {gpu: "0.3333333"}}
"""
)
T = datetime(2026, 11, 24, 11, 45, 7, tzinfo=UTC)


NOTHING_STORED: dict[bytes, bytes] = {}


def gpu_event(heartbeat: dict[str, Any]) -> bytes:
    envelope = {"specversion": "1.0", "id": "g", "source": "s", "time": T.isoformat(), "subject": "acct-1"}
    data = {"session_id": "s", "node_id": "n", "utilization": "0.5", **heartbeat}
    return msgspec.json.encode({**envelope, "type": "gpu.usage.v1", "data": data})


quantities = st.builds(decimal_text, st.integers(0, 10**15), st.integers(-12, 0)).filter(
    lambda d: Decimal(d) <= 10**15
)
heartbeats = st.fixed_dictionaries(
    {
        "vram_total_gb": quantities,
        "vram_allocated_gb": st.integers(1, 8),  # the share of the total, made a quantity below
        # What only the Python path admits (the native core then re-reads its normalized text).
        "power_watts": quantities | st.sampled_from(["-0", "1E+2", "0.30000000000000004", "5E-20", "0E-30"]),
        "gpu_model": st.sampled_from(["h100", "a100", "rtx_4090"]),
        "provider_id": st.sampled_from(["prov-1", "prov-min"]),
        "interval_seconds": st.integers(1, 86_400),
        "gpu_count": st.integers(1, 1024),
    }
)


def windows_of(plan: AccountPlan, stored: Stored | None = None) -> Windows:
    return Windows(WindowConfig(), FixedPlans(plan), NOTHING_STORED.get, stored or Stored.nothing())


@settings(max_examples=1_000, deadline=None)
@given(heartbeats)
def test_a_gpu_heartbeat_costs_exactly_what_the_rule_says(heartbeat: dict[str, Any]) -> None:
    """Fractional VRAM (a share such as 10/24, never divided in the window), power, a demand step,
    a provider's minimum: the window holds exactly rate x GPUs x seconds, per second."""
    heartbeat["vram_allocated_gb"] = str(Decimal(heartbeat["vram_total_gb"]) / heartbeat["vram_allocated_gb"])
    windows = windows_of(AccountPlan(BOOK))
    windows.add(event_decoder.decode(gpu_event(heartbeat)))
    [tally] = windows.open.values()
    rates = BOOK.versions[0].gpu
    assert rates is not None
    model = heartbeat["gpu_model"]
    total, allocated = Fraction(heartbeat["vram_total_gb"]), Fraction(Decimal(heartbeat["vram_allocated_gb"]))
    share = allocated / total if total else Fraction(1)
    hourly = Fraction(rates.base_rate_per_hour[model]) * share + Fraction(
        Decimal(heartbeat["power_watts"])
    ) * Fraction(rates.power_rate_per_watt_hour)
    hourly *= Fraction(rates.demand_at(T, model))
    floor = rates.provider_minimum_per_hour.get(heartbeat["provider_id"])
    if floor and Fraction(floor) > hourly:
        hourly = Fraction(floor)
    seconds = heartbeat["interval_seconds"] * heartbeat["gpu_count"]
    assert tally.quantity == seconds  # exact seconds: rounding up is the session's, at its end
    assert tally.exact() == hourly * seconds


def add(windows: Windows, serial: int, kind: str, data: dict[str, Any]) -> None:
    envelope = {"specversion": "1.0", "source": "s", "time": T.isoformat(), "subject": "acct-1"}
    windows.add(
        event_decoder.decode(msgspec.json.encode({**envelope, "id": str(serial), "type": kind, "data": data}))
    )


def test_storage_and_compute_cost_what_the_book_says() -> None:
    windows = windows_of(AccountPlan(BOOK, None, "pro"))
    held = {"storage_kind": "bucket", "resource_id": "r", "gb": "1234.5678901", "duration_seconds": 3599}
    add(windows, 1, "storage.usage.v1", held)
    add(windows, 2, "session.started.v1", {"session_id": "c", "resource_tier": "gpu"})
    add(windows, 3, "session.ended.v1", {"session_id": "c", "duration_seconds": 7_321})
    tallies = {key[1]: tally for key, tally in windows.open.items()}
    gb_seconds = Fraction(Decimal("1234.5678901")) * 3599
    assert tallies["storage:bucket"].exact() == gb_seconds * Fraction(Decimal("0.0234567"))
    assert tallies["compute:gpu"].exact() == 7_321 * Fraction(Decimal("0.3333333"))


def test_window_state_is_msgspecs_encoding_byte_for_byte() -> None:
    """Every kind of open window (GPU, storage, API overage and products, compute) as the native
    core stores it is exactly what msgspec writes for the decoded key and tally."""
    plan = LoadPlan(
        2_000, accounts=30, bad_fraction=0, duplicate_fraction=0, ordered_time=True, time_span_s=120
    )
    windows = windows_of(AccountPlan(DEFAULT_BOOK, "growth", "pro"))
    for message in generate(plan, datetime(2026, 11, 24, 12, tzinfo=UTC), Expected()):
        assert windows.core.add(encoder.encode(event_decoder.decode(message.value))) is None
    entries = windows.core.open_windows()
    meters = {decode_key(k)[1].split(":")[0] for k, _ in entries}
    assert meters == {"gpu", "storage", "api_overage", "product", "compute"}
    assert len(entries) > 500
    for key, value in entries:
        assert state_key(OPEN, decode_key(key)) == key
        tally = _tally.decode(value)
        assert _codec.encode(tally) == value
    # A restart reads them back as they were.
    again = windows_of(AccountPlan(BOOK), Stored(entries, [], windows.watermark))
    assert sorted(again.core.open_windows()) == sorted(entries)


def test_mark_records_are_encode_marks_output() -> None:
    core = native(DEFAULTS)
    for value in loadgen_messages(100):
        core.ingest([Record(value)], 0)
    output = core.take()
    assert len(output.marks) > 100
    assert output.mark_records == encode_marks(dict(output.marks))
    assert [pair for record in output.mark_records for pair in decode_marks(record)] == output.marks
    assert output.marks == sorted(output.marks)
