"""Dedupe core and its on-disk store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from agents.dedupe import decode_marks, encode_marks
from schemas.events import encode_batch, encoder, event_decoder, fingerprint, identity_key
from schemas.rejections import Reason, reason_of
from sinks.statestore import MemoryStore, PartitionStore
from tests.unit.meter_in_memory import MeterRun


def event(event_id: str, source: str = "src", amount: int = 1) -> bytes:
    return msgspec.json.encode(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": "api.request.v1",
            "time": "2026-11-24T10:00:00Z",
            "subject": "acct-1",
            "data": {"endpoint": "/x", "request_count": amount},
        }
    )


NOW = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)


def normalized(raw: bytes) -> bytes:
    """What ingest makes of an event: the bytes dedupe fingerprints and the meter forwards."""
    return encoder.encode(event_decoder.decode(raw))


def run(tmp_path: Path, *messages: list[bytes], committed: dict[bytes, bytes] | None = None) -> MeterRun:
    """One poll of ``messages`` (each a batch) through the meter, over ``committed`` marks."""
    store = MemoryStore()
    store.data.update(committed or {})
    meter = MeterRun(tmp_path, store=store)
    meter.poll([encode_batch(events) for events in messages], NOW)
    return meter


def test_first_sighting_is_accepted_and_marked(tmp_path: Path) -> None:
    meter = run(tmp_path, [event("a"), event("b")])
    assert meter.accepted() == [normalized(event("a")), normalized(event("b"))]
    marks = {k: v for k, v in meter.store.data.items() if not k.startswith(b"\x00")}
    assert marks == {
        identity_key("src", "a"): fingerprint(normalized(event("a"))),
        identity_key("src", "b"): fingerprint(normalized(event("b"))),
    }


def test_repeat_within_the_transaction_is_a_duplicate(tmp_path: Path) -> None:
    meter = run(tmp_path, [event("a"), event("a")], [event("a")])
    assert meter.accepted() == [normalized(event("a"))]
    assert meter.outcomes[0].counters["duplicates"] == 2
    assert meter.sent(meter.settings.topic_rejected) == []


def test_repeat_of_a_committed_mark_is_a_duplicate(tmp_path: Path) -> None:
    committed = {identity_key("src", "a"): fingerprint(normalized(event("a")))}
    meter = run(tmp_path, [event("a"), event("b")], committed=committed)
    assert meter.accepted() == [normalized(event("b"))]
    assert meter.outcomes[0].counters["duplicates"] == 1


def test_a_copy_in_other_bytes_is_a_duplicate(tmp_path: Path) -> None:
    """Key order, spacing and UTC offset do not make another payload: the normalized bytes match."""
    copy = msgspec.json.encode(dict(reversed(msgspec.json.decode(event("a")).items())))
    copy = copy.replace(b"2026-11-24T10:00:00Z", b"2026-11-24T12:00:00+02:00")
    meter = run(tmp_path, [event("a")], [copy])
    assert meter.accepted() == [normalized(event("a"))]
    assert meter.outcomes[0].counters["duplicates"] == 1


def test_same_identity_other_payload_is_a_conflict(tmp_path: Path) -> None:
    committed = {identity_key("src", "a"): fingerprint(normalized(event("a")))}
    meter = run(tmp_path, [event("a", amount=5)], committed=committed)
    assert meter.accepted() == []
    [dead] = meter.sent(meter.settings.topic_rejected)
    assert reason_of(dead.headers) == Reason.ID_CONFLICT.value
    assert dead.value == normalized(event("a", amount=5))
    assert dict(dead.headers)["tally.origin"] == f"{meter.settings.topic_raw}/0/0".encode()
    assert b"('src', 'a') was seen before" in dict(dead.headers)["tally.detail"]


def test_identity_is_source_and_id(tmp_path: Path) -> None:
    meter = run(tmp_path, [event("a", source="s1"), event("a", source="s2")])
    assert len(meter.accepted()) == 2


def test_marks_leave_as_changelog_records_the_store_takes_after_the_commit(tmp_path: Path) -> None:
    meter = run(tmp_path, [event(str(i)) for i in range(100)])
    changelog = meter.sent(f"{meter.settings.app_id}-meter-changelog")
    pairs = dict(item for m in changelog for item in decode_marks(m.value))
    assert {k: v for k, v in pairs.items() if not k.startswith(b"\x00")} == {
        identity_key("src", str(i)): fingerprint(normalized(event(str(i)))) for i in range(100)
    }
    assert all(meter.store.get(k) == v for k, v in pairs.items() if v)  # applied after the commit
    # The changelog records lead the transaction's messages (offsets 1..n here): the store is at n + 1.
    assert meter.store.next_changelog_offset == len(changelog) + 1


def test_marks_round_trip_through_the_changelog_encoding_in_bounded_records() -> None:
    marks = {identity_key("s", str(i)): fingerprint(event(str(i))) for i in range(100)}
    (record,) = encode_marks(marks)
    assert decode_marks(record) == list(marks.items())
    many = {identity_key("source", f"event-{i:08d}"): fingerprint(event(str(i))) for i in range(50_000)}
    records = encode_marks(many, limit=100_000)
    assert len(records) > 10
    assert all(len(r) < 110_000 for r in records)
    assert [item for r in records for item in decode_marks(r)] == list(many.items())


def test_nothing_to_mark_writes_no_changelog_record() -> None:
    assert encode_marks({}) == []


def test_store_applies_marks_with_their_changelog_offset_and_survives_reopen(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "p0", ttl=timedelta(days=35))
    assert store.next_changelog_offset == 0
    store.apply([(b"k1", b"f1"), (b"k2", b"f2")], next_changelog_offset=7)
    assert store.get(b"k1") == b"f1"
    assert store.get(b"missing") is None
    store.close()
    reopened = PartitionStore(tmp_path / "p0", ttl=timedelta(days=35))
    assert reopened.get(b"k2") == b"f2"
    assert reopened.next_changelog_offset == 7
    reopened.close()


def test_changelog_records_stay_under_the_limit_whatever_the_identity_sizes() -> None:
    short = {identity_key("s", str(i)): fingerprint(event(str(i))) for i in range(90_000)}
    long = {identity_key("s" * 512, f"{i:0256d}"): fingerprint(event(str(i))) for i in range(10_000)}
    records = encode_marks({**short, **long}, limit=512 * 1024)
    assert max(len(r) for r in records) <= 512 * 1024
    assert sum(len(decode_marks(r)) for r in records) == 100_000


def gpu(event_id: str, model: str) -> bytes:
    data: dict[str, object] = {"session_id": "s", "provider_id": "p", "node_id": "n", "gpu_model": model}
    data |= {"vram_total_gb": "24", "vram_allocated_gb": "12", "power_watts": "300", "utilization": "0.5"}
    data["interval_seconds"] = 60
    envelope = {"specversion": "1.0", "id": event_id, "source": "src", "type": "gpu.usage.v1"}
    return msgspec.json.encode(
        {**envelope, "time": "2026-11-24T10:00:00Z", "subject": "acct-1", "data": data}
    )


def test_a_refused_events_mark_is_withdrawn_before_the_next_event(tmp_path: Path) -> None:
    """Dedupe and the windows take a message event by event: an event its book cannot price is
    dead-lettered and unmarked, so its corrected copy, even next in the same message, is accepted,
    and a repeat of the refused one is refused again (dead-lettered, not counted a duplicate)."""
    meter = run(tmp_path, [gpu("a", "b200"), gpu("a", "h100"), gpu("b", "b200"), gpu("b", "b200")])
    assert meter.accepted() == [normalized(gpu("a", "h100"))]
    dead = meter.sent(meter.settings.topic_rejected)
    assert [reason_of(m.headers) for m in dead] == ["unpriced"] * 3
    assert meter.outcomes[0].counters["duplicates"] == 0


def test_dead_letters_leave_in_kafka_order(tmp_path: Path) -> None:
    """Ingest's reasons (a message the native path declines) and the windows' come out in the
    order of the messages that caused them."""
    meter = MeterRun(tmp_path)
    meter.poll([encode_batch([gpu("a", "b200")]), b"not json", encode_batch([gpu("b", "b200")])], NOW)
    dead = meter.sent(meter.settings.topic_rejected)
    assert [reason_of(m.headers) for m in dead] == ["unpriced", "malformed_json", "unpriced"]
