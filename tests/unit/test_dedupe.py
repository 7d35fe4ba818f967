"""Dedupe core and its on-disk store."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec

from agents.dedupe import DedupeResult, decode_marks, dedupe_records, encode_marks
from schemas.events import ValidRecord, event_decoder, fingerprint, identity_key
from schemas.rejections import Reason
from sinks.statestore import PartitionStore


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


def run(*messages: list[bytes], committed: dict[bytes, bytes] | None = None) -> DedupeResult:
    store = committed or {}
    result = DedupeResult()
    for offset, events in enumerate(messages):
        origins = [f"usage.raw/0/{offset}"] * len(events)
        dedupe_records(valid_records(events), origins, store.get, result)
    return result


def bodies(result: DedupeResult) -> list[bytes]:
    return [raw for _, _, raw, _ in result.accepted]


def valid_records(events: list[bytes]) -> list[ValidRecord]:
    """The records ingest hands dedupe for these (normalized) events."""
    records = []
    for raw in events:
        parsed = msgspec.json.decode(raw)
        key = identity_key(parsed["source"], parsed["id"])
        records.append((key, fingerprint(raw), raw, event_decoder.decode(raw)))
    return records


def test_first_sighting_is_accepted_and_marked() -> None:
    result = run([event("a"), event("b")])
    assert bodies(result) == [event("a"), event("b")]
    assert result.marks == {
        identity_key("src", "a"): fingerprint(event("a")),
        identity_key("src", "b"): fingerprint(event("b")),
    }


def test_repeat_within_the_transaction_is_a_duplicate() -> None:
    result = run([event("a"), event("a")], [event("a")])
    assert bodies(result) == [event("a")]
    assert result.duplicates == 2
    assert result.rejected == []


def test_repeat_of_a_committed_mark_is_a_duplicate() -> None:
    committed = {identity_key("src", "a"): fingerprint(event("a"))}
    result = run([event("a"), event("b")], committed=committed)
    assert bodies(result) == [event("b")]
    assert result.duplicates == 1


def test_same_identity_other_payload_is_a_conflict() -> None:
    committed = {identity_key("src", "a"): fingerprint(event("a"))}
    result = run([event("a", amount=5)], committed=committed)
    assert bodies(result) == []
    assert [r.reason for r in result.rejected] == [Reason.ID_CONFLICT]
    assert result.rejected[0].original == event("a", amount=5)
    assert result.rejected[0].origin == "usage.raw/0/0"


def test_identity_is_source_and_id() -> None:
    result = run([event("a", source="s1"), event("a", source="s2")])
    assert len(result.accepted) == 2


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
