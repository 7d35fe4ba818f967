"""The analytics agent's batching rules (agents.analytics.Batcher): pure, no services."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from agents.analytics import PENDING, Batcher, rejection_row

USAGE = TopicPartition("usage.accepted", 0)
DEAD = TopicPartition("usage.rejected", 0)
TABLES = {"usage.accepted": "usage_events", "usage.rejected": "rejections"}


def record(
    tp: TopicPartition, offset: int, events: int = 2, headers: tuple[tuple[str, bytes], ...] = ()
) -> ConsumerRecord[bytes, bytes]:
    value = b"[" + b",".join(b'{"specversion":"1.0","id":"%d"}' % i for i in range(events)) + b"]"
    return ConsumerRecord(
        tp.topic, tp.partition, offset, 1_700_000_000_000, 0, None, value, None, len(value), 0, list(headers)
    )


def test_a_batch_is_cut_by_rows_or_age_and_continues_from_the_committed_offset() -> None:
    batcher = Batcher(TABLES, max_rows=5, max_age_s=2.0)
    batcher.assign(USAGE, OffsetAndMetadata(10, ""))
    batcher.add(USAGE, record(USAGE, 10), now=0.0)
    batcher.add(USAGE, record(USAGE, 12), now=0.5)  # 11 was a transaction marker
    assert batcher.freeze_due(now=1.0) == {}  # 4 rows, 1 s old: neither bound reached
    batcher.add(USAGE, record(USAGE, 13), now=1.0)
    frozen = batcher.freeze_due(now=1.0)[USAGE]
    assert (frozen.start, frozen.last, frozen.rows, frozen.offsets) == (10, 13, 6, [10, 12, 13])
    assert frozen.token(USAGE) == "usage.accepted:0:10-13"
    batcher.add(USAGE, record(USAGE, 12), now=1.5)  # a stale copy, while the batch is in flight
    batcher.add(USAGE, record(USAGE, 14), now=1.5)
    assert batcher.freeze_due(now=9.0) == {}  # one batch in flight per partition
    assert batcher.in_flight(USAGE, frozen)
    batcher.done(USAGE, frozen)
    assert not batcher.in_flight(USAGE, frozen)
    following = batcher.freeze_due(now=9.0)[USAGE]  # old enough now
    assert (following.start, following.last) == (14, 14)


def test_records_before_the_committed_offset_are_skipped() -> None:
    batcher = Batcher(TABLES, max_rows=100, max_age_s=1.0)
    batcher.assign(USAGE, OffsetAndMetadata(20, ""))
    for offset in (18, 19, 20, 20, 21):  # fetched before a re-seek, and a repeat
        batcher.add(USAGE, record(USAGE, offset), now=0.0)
    frozen = batcher.freeze_due(now=5.0)[USAGE]
    assert frozen.offsets == [20, 21]


def test_a_pending_range_from_the_commit_metadata_is_cut_exactly_again() -> None:
    # A worker recorded "pending: up to 15" at offset 10 and died before committing 16.
    batcher = Batcher(TABLES, max_rows=1, max_age_s=0.0)
    batcher.assign(USAGE, OffsetAndMetadata(10, f"{PENDING}15"))
    batcher.add(USAGE, record(USAGE, 10), now=0.0)
    assert batcher.freeze_due(now=100.0) == {}  # full and old, but the range is not complete
    for offset in (13, 15, 16, 18):
        batcher.add(USAGE, record(USAGE, offset), now=0.0)
    frozen = batcher.freeze_due(now=100.0)[USAGE]
    assert (frozen.token(USAGE), frozen.offsets) == ("usage.accepted:0:10-15", [10, 13, 15])
    batcher.done(USAGE, frozen)
    rest = batcher.freeze_due(now=100.0)[USAGE]
    assert (rest.start, rest.offsets) == (16, [16, 18])


def test_without_a_commit_the_first_record_starts_the_batch_and_revoked_partitions_drop_theirs() -> None:
    batcher = Batcher(TABLES, max_rows=1, max_age_s=1.0)
    batcher.assign(USAGE, None)
    batcher.add(USAGE, record(USAGE, 7), now=0.0)
    assert batcher.freeze_due(now=0.0)[USAGE].start == 7
    frozen = batcher.partitions[USAGE].frozen
    assert frozen is not None
    batcher.assign(USAGE, OffsetAndMetadata(7, f"{PENDING}7"))  # reassigned during the insert
    assert not batcher.in_flight(USAGE, frozen)  # so the old flush does not write it
    batcher.revoke(USAGE)
    batcher.add(USAGE, record(USAGE, 8), now=0.0)  # polled before the revocation took effect
    assert batcher.freeze_due(now=5.0, everything=True) == {}


def test_a_dead_letter_becomes_one_row_from_its_headers() -> None:
    headers = (
        ("tally.reason", b"too_late"),
        ("tally.stage", b"meter"),
        ("tally.origin", b"v/1/2"),
        ("tally.detail", b"old"),
    )
    row = rejection_row(record(DEAD, 5, events=1, headers=headers))
    assert row.startswith(b'[{"time":"2023-11-14T22:13:20+00:00","reason":"too_late","stage":"meter"')
    batcher = Batcher(TABLES, max_rows=1, max_age_s=1.0)
    batcher.assign(DEAD, None)
    batcher.add(DEAD, record(DEAD, 5, events=1, headers=headers), now=0.0)
    assert batcher.freeze_due(now=0.0)[DEAD].arrays == [row]
