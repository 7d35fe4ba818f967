"""Ingest core: every kind of bad input gets its reason, nothing raises, good events are normalized."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.ingest import IngestCore, IngestPolicy, IngestResult, PartitionedBatches, Partitioner
from schemas.events import event_decoder, fingerprint, identity_key
from schemas.rejections import Reason

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
POLICY = IngestPolicy(
    max_message_bytes=100_000,
    max_event_bytes=10_000,
    future_tolerance=timedelta(minutes=5),
    horizon=timedelta(days=35),
    known_accounts=frozenset({"acct-1", "acct-2"}),
)


def gpu_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "node-agent/eu-1",
        "type": "gpu.usage.v1",
        "time": "2026-11-24T11:59:00Z",
        "subject": "acct-1",
        "data": {
            "session_id": "s-1",
            "provider_id": "prov-1",
            "node_id": "node-1",
            "gpu_model": "rtx_4090",
            "vram_total_gb": "24",
            "vram_allocated_gb": "12",
            "power_watts": "350",
            "utilization": "0.8",
            "interval_seconds": 60,
        },
    }
    data = changes.pop("data", {})
    event.update(changes)
    event["data"].update(data)
    return event


STORAGE = {"storage_kind": "bucket", "resource_id": "r", "gb": "1", "duration_seconds": 60}


def api_event(**changes: Any) -> dict[str, Any]:
    event = {**gpu_event(), "type": "api.request.v1", "id": "api-1"}
    event["data"] = {"endpoint": "/v1/chat", "request_count": 3, "tokens_in": 100, "tokens_out": 20}
    data = changes.pop("data", {})
    event.update(changes)
    event["data"].update(data)
    return event


def run(*values: bytes | None) -> IngestResult:
    core = IngestCore(POLICY, Partitioner(6))
    result = core.new_result(NOW)
    for offset, value in enumerate(values):
        core.process(value, f"usage.raw/0/{offset}", result)
    return result


def accepted(result: IngestResult) -> list[dict[str, Any]]:
    return [msgspec.json.decode(raw) for _, records in result.accepted.drain() for _, _, raw, _ in records]


def reasons(result: IngestResult) -> list[str]:
    return [r.reason.value for r in result.rejected]


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_a_good_event_is_accepted_and_normalized_to_utc() -> None:
    result = run(enc(gpu_event(time="2026-11-24T13:59:00+02:00")))
    (event,) = accepted(result)
    assert event["time"] == "2026-11-24T11:59:00Z"
    assert event["data"]["vram_allocated_gb"] == "12"
    assert result.rejected == []


def test_equal_payloads_in_different_spelling_normalize_to_equal_bytes() -> None:
    one = enc(gpu_event())
    other = json.dumps(dict(reversed(list(gpu_event(time="2026-11-24T12:59:00+01:00").items()))), indent=1)
    result = run(one, other.encode())
    (_partition, events), *_ = list(result.accepted.drain())
    assert len(events) == 2
    assert events[0] == events[1]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"specversion": "1.0", "id": ', Reason.MALFORMED_JSON),
        (b"\xff\xfe\x00garbage", Reason.MALFORMED_JSON),
        (enc(gpu_event()).replace(b'"id"', b'"x": NaN, "id"'), Reason.MALFORMED_JSON),
        (b"", Reason.MALFORMED_JSON),
        (None, Reason.MALFORMED_JSON),
        (b"42", Reason.SCHEMA_VIOLATION),
        (b'"a string"', Reason.SCHEMA_VIOLATION),
        (enc({k: v for k, v in gpu_event().items() if k != "source"}), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(subject=12)), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(specversion="0.3")), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(time="2026-11-24T11:59:00")), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(time="yesterday")), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"interval_seconds": "sixty"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"vram_allocated_gb": "30"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"utilization": "1.5"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"power_watts": "1e30"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"power_watts": "NaN"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"power_watts": "Infinity"})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(data={"power_watts": 1e308})), Reason.SCHEMA_VIOLATION),
        (enc(api_event(data={"request_count": 10**30})), Reason.SCHEMA_VIOLATION),
        (enc(api_event(data={"request_count": 2**70})), Reason.SCHEMA_VIOLATION),
        (enc(gpu_event(type="gpu.usage.v9")), Reason.UNKNOWN_TYPE),
        (enc(gpu_event(type="")), Reason.UNKNOWN_TYPE),
        (enc(api_event(data={"request_count": -1})), Reason.NEGATIVE_QUANTITY),
        (enc(api_event(data={"tokens_out": -5})), Reason.NEGATIVE_QUANTITY),
        (enc(gpu_event(data={"power_watts": "-350"})), Reason.NEGATIVE_QUANTITY),
        (enc(gpu_event(data={"vram_total_gb": -24, "vram_allocated_gb": -30})), Reason.NEGATIVE_QUANTITY),
        (enc(gpu_event(data={"utilization": "0." + "1" * 29})), Reason.SCHEMA_VIOLATION),  # 29 digits
        (
            enc(api_event(type="storage.usage.v1", data=STORAGE | {"gb": "1." + "0" * 28})),
            Reason.SCHEMA_VIOLATION,
        ),
        (enc(gpu_event(time="2026-10-01T00:00:00Z")), Reason.TOO_LATE),
        (enc(gpu_event(time="1970-01-01T00:00:00Z")), Reason.TOO_LATE),
        (enc(gpu_event(time="2026-11-24T12:06:00Z")), Reason.TOO_FAR_IN_FUTURE),
        (enc(gpu_event(time="9999-12-31T23:59:59Z")), Reason.TOO_FAR_IN_FUTURE),
        (enc(gpu_event(padding="x" * 20_000)), Reason.OVERSIZED),
        (b"[" + b",".join([enc(gpu_event())] * 400) + b"]", Reason.OVERSIZED),  # ~170 kB message
        (enc(gpu_event(subject="ghost")), Reason.UNKNOWN_ACCOUNT),
    ],
)
def test_bad_input_gets_its_reason_and_keeps_its_bytes(value: bytes | None, reason: Reason) -> None:
    result = run(value)
    assert reasons(result) == [reason.value]
    assert result.rejected[0].original == (value or b"")
    assert result.rejected[0].detail
    assert result.accepted.count == 0


def test_quantities_of_up_to_28_digits_are_accepted_as_they_are() -> None:
    """A float's 17 digits, a signed zero, an exponent: exact in the 28 digits money uses."""
    for watts in ["0.30000000000000004", "-0", "1E+2", "0." + "1" * 28, 350.25]:
        result = run(enc(gpu_event(data={"power_watts": watts})))
        assert result.rejected == [], watts
        [(_, [(_, _, body, _)])] = list(result.accepted.drain())
        assert msgspec.json.decode(body)["data"]["power_watts"] == str(Decimal(str(watts)))


def test_event_within_tolerance_and_horizon_is_accepted() -> None:
    assert run(enc(gpu_event(time="2026-11-24T12:04:59Z"))).accepted.count == 1
    assert run(enc(gpu_event(time="2026-10-21T12:00:01Z"))).accepted.count == 1


def test_a_batch_with_bad_events_rejects_only_those() -> None:
    batch = [
        gpu_event(id="a"),
        api_event(id="b", data={"request_count": -1}),
        gpu_event(id="c", type="nope.v1"),
        api_event(id="d"),
        42,
    ]
    result = run(enc(batch))
    assert sorted(e["id"] for e in accepted(result)) == ["a", "d"]
    assert sorted(reasons(result)) == ["negative_quantity", "schema_violation", "unknown_type"]
    origins = sorted(r.origin for r in result.rejected)
    assert origins == ["usage.raw/0/0#1", "usage.raw/0/0#2", "usage.raw/0/0#4"]
    assert msgspec.json.decode(result.rejected[0].original)["id"] == "b"


def test_an_empty_batch_yields_nothing() -> None:
    result = run(b"[]")
    assert result.accepted.count == 0 and result.rejected == []


def test_events_are_routed_by_account_with_kafkas_partitioner() -> None:
    result = run(enc([gpu_event(id=str(i), subject=f"acct-{1 + i % 2}") for i in range(10)]))
    partitioner = Partitioner(6)
    for partition, events in result.accepted.drain():
        assert {partitioner(msgspec.json.decode(e)["subject"]) for _, _, e, _ in events} == {partition}
    # Partitions Kafka's Java producer picks among 1000 for these keys (kafka-python's compatibility table).
    java = {"": 681, "a": 524, "ab": 434, "abc": 107, "123456789": 566}
    assert {key: Partitioner(1000)(key) for key in java} == java


def test_accepted_records_carry_identity_and_fingerprint_in_order() -> None:
    batches = PartitionedBatches(partitions=1)
    events = [event_decoder.decode(enc(api_event(id=f"id-{i:02d}"))) for i in range(25)]
    batches.add(events, Partitioner(1), "usage.raw/0/0")
    assert batches.count == 25
    [(partition, decoded)] = list(batches.drain())
    assert partition == 0 and list(batches.drain()) == []
    assert [key for key, _, _, _ in decoded] == [
        identity_key("node-agent/eu-1", f"id-{i:02d}") for i in range(25)
    ]
    assert all(fp == fingerprint(event) for _, fp, event, _ in decoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2_000))
def test_arbitrary_bytes_never_raise(value: bytes) -> None:
    result = run(value)
    assert (
        result.accepted.count + len(result.rejected) >= 1
        or value.strip() in {b"[]"}
        or value.lstrip()[:1] == b"["
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "source", "time", "subject", "type", "data", "specversion"]),
        json_values,
        max_size=7,
    )
)
def test_arbitrary_envelopes_are_accepted_or_rejected_never_raised(fields: dict[str, Any]) -> None:
    event = {**gpu_event(), **fields}
    result = run(enc(event))
    assert result.accepted.count + len(result.rejected) == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([gpu_event(), api_event(data={"request_count": -1}), 7, "x"]), max_size=30))
def test_batches_account_for_every_element(elements: list[Any]) -> None:
    result = run(enc(elements))
    assert result.accepted.count + len(result.rejected) == len(elements)


def test_deeply_nested_arrays_are_dead_lettered_not_raised() -> None:
    value = b"[" * 5_000 + b"]" * 5_000
    result = run(value)
    assert reasons(result) == ["malformed_json"]
    assert result.rejected[0].original == value


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [gpu_event(time="2026-11-24T13:00:00+01:00"), api_event(), gpu_event(subject="acct-2")]
        ),
        min_size=1,
        max_size=20,
    )
)
def test_a_clean_batch_comes_out_as_its_events_would_one_by_one(events: list[dict[str, Any]]) -> None:
    as_batch = run(enc(events))  # small and clean: the one-call fast path
    one_by_one = run(*(enc(e) for e in events))
    assert list(as_batch.accepted.drain()) == list(one_by_one.accepted.drain())
    assert as_batch.rejected == []


def test_one_bad_event_sends_a_small_batch_down_the_per_event_path() -> None:
    batch = [gpu_event(id="a"), gpu_event(id="b", time="1970-01-01T00:00:00Z"), api_event(id="c")]
    result = run(enc(batch))
    assert sorted(e["id"] for e in accepted(result)) == ["a", "c"]
    assert [(r.reason.value, r.origin) for r in result.rejected] == [("too_late", "usage.raw/0/0#1")]


# Decimal spellings at and past every bound the checks hold quantities to (and ones no comparison
# can order): the batch fast path's one-expression test must pass exactly what ``_check`` passes.
EDGE_DECIMALS = ["0", "12", "24", "24.0000001", "-0", "-1", "0.8", "1", "1.01", "1E15", "1E15.5", "1e16",
                 "NaN", "sNaN", "Infinity", "-Infinity", "1E+15", "0E-30"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda total, allocated, watts, utilization, minutes: gpu_event(
                    time=f"2026-11-24T12:{minutes:02d}:00Z",
                    data={
                        "vram_total_gb": total,
                        "vram_allocated_gb": allocated,
                        "power_watts": watts,
                        "utilization": utilization,
                    },
                ),
                *[st.sampled_from(EDGE_DECIMALS)] * 4,
                st.sampled_from([0, 5, 6]),  # now, at the tolerance, past it
            ),
            st.builds(
                lambda gb: {
                    **api_event(),
                    "type": "storage.usage.v1",
                    "data": {"storage_kind": "bucket", "resource_id": "r", "gb": gb, "duration_seconds": 60},
                },
                st.sampled_from(EDGE_DECIMALS),
            ),
            st.builds(
                lambda total, allocated: {
                    **api_event(),
                    "type": "session.started.v1",
                    "data": {"session_id": "s", "vram_total_gb": total, "vram_allocated_gb": allocated},
                },
                st.sampled_from([None, *EDGE_DECIMALS]),
                st.sampled_from([None, *EDGE_DECIMALS]),
            ),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_the_batch_fast_path_accepts_exactly_what_the_checks_accept(events: list[dict[str, Any]]) -> None:
    events = [{**e, "data": {k: v for k, v in e["data"].items() if v is not None}} for e in events]
    for index, event in enumerate(events):
        event["id"] = f"e{index}"
    as_batch = run(enc(events))
    one_by_one = run(*(enc(e) for e in events))
    assert list(as_batch.accepted.drain()) == list(one_by_one.accepted.drain())
    assert reasons(as_batch) == reasons(one_by_one)
