"""Meter, first part: the dedupe stage, ``usage.valid`` -> ``usage.accepted`` (shell).

The logic is ``agents.dedupe`` (pure). This shell gives it a RocksDB store per input partition
(``sinks.statestore``) and a changelog topic, and runs on the exactly-once loop
(``pipeline.transactional``), so per poll and partition one Kafka transaction holds:
the accepted batch (one message, to the same partition number of ``usage.accepted``: both topics are
partitioned by account), the ``id_conflict`` dead letters, ONE changelog message with every new mark
of the poll, and the consumed offsets.

Order of steps, and the guarantee each gives:
1. on assignment, ``restore``: replay the changelog partition from the offset the local store
   recorded to its last committed record. The store then holds every mark committed by any worker.
2. ``process``: dedupe against pending marks, then the store. Marks are only pending.
3. the loop commits the transaction (outputs + changelog + offsets) - the commit point.
4. ``committed``: the pending marks and the changelog offset after them go into the store in one
   atomic write. A crash before 4 is repaired by 1 on the next start.
An event is thus marked seen in the same commit that makes it accepted, never earlier or later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from agents.dedupe import DedupeResult, decode_marks, dedupe_message, encode_marks
from agents.ingest import rejection_message
from pipeline.settings import Settings
from pipeline.transactional import Outcome, Outgoing
from schemas.events import cut_by_size, encode_batch
from schemas.rejections import rejection_counters
from sinks.statestore import PartitionStore

log = logging.getLogger(__name__)

# Changelog records read per restore poll.
RESTORE_BATCH = 10_000


def dedupe_changelog_topic(settings: Settings) -> str:
    return f"{settings.app_id}-meter-dedupe-changelog"


class DedupeTask:
    def __init__(self, settings: Settings, partition: int, store: PartitionStore) -> None:
        self.partition = partition
        self.store = store
        self.accepted_topic = settings.topic_accepted
        self.rejected_topic = settings.topic_rejected
        self.changelog_topic = dedupe_changelog_topic(settings)
        self.origin_prefix = f"{settings.topic_valid}/{partition}/"

    def process(self, records: Sequence[ConsumerRecord[bytes, bytes]], now: datetime) -> Outcome:
        result = DedupeResult()
        lookup = self.store.get
        prefix = self.origin_prefix
        for record in records:
            dedupe_message(record.value, f"{prefix}{record.offset}", lookup, result)
        # Changelog records first, so their metadata leads in ``committed``; every message is cut
        # to a bounded size (one poll can bring ~20 MiB of events for a partition).
        messages = [
            Outgoing(self.changelog_topic, record, partition=self.partition)
            for record in encode_marks(result.marks)
        ]
        changelog_records = len(messages)
        messages.extend(
            Outgoing(self.accepted_topic, encode_batch(chunk), partition=self.partition)
            for chunk in cut_by_size(result.accepted)
        )
        messages.extend(rejection_message(self.rejected_topic, r) for r in result.rejected)
        counters = {
            "accepted": len(result.accepted),
            "duplicates": result.duplicates,
            **rejection_counters(result.rejected),
        }
        return Outcome(messages, state=(result.marks, changelog_records), counters=counters)

    def committed(self, outcome: Outcome, metadata: Sequence[RecordMetadata]) -> None:
        marks, changelog_records = outcome.state
        if marks:
            self.store.apply(marks.items(), metadata[changelog_records - 1].offset + 1)

    def close(self) -> None:
        self.store.close()


class DedupeStage:
    name = "meter"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.input_topic = settings.topic_valid

    async def open_task(self, partition: int) -> DedupeTask:
        path = self.settings.state_dir / "meter-dedupe" / f"p{partition}"
        topic = dedupe_changelog_topic(self.settings)
        store = PartitionStore(path, ttl=mark_ttl(self.settings))
        try:
            await restore(self.settings, topic, partition, store)
        except StoreAheadOfChangelogError as exc:
            # The changelog was recreated or truncated: the store's marks are not the truth any
            # more, and trusting them could drop new events as duplicates. Rebuild from the log.
            log.warning("meter: %s; rebuilding partition %d from the changelog", exc, partition)
            store.close()
            PartitionStore.destroy(path)
            store = PartitionStore(path, ttl=mark_ttl(self.settings))
            await restore(self.settings, topic, partition, store)
        except BaseException:
            store.close()
            raise
        return DedupeTask(self.settings, partition, store)


def mark_ttl(settings: Settings) -> timedelta:
    """How long a mark lives: the horizon, plus the clock skew ingest tolerates and a day of
    backlog, so a copy that ingest still accepts always finds its mark (the changelog's retention
    is horizon + 1 day as well)."""
    return settings.dedupe_horizon + settings.future_tolerance + timedelta(days=1)


class StoreAheadOfChangelogError(RuntimeError):
    """The local store says it applied changelog records the changelog does not have."""


async def restore(settings: Settings, topic: str, partition: int, store: PartitionStore) -> int:
    """Replay committed changelog records the store has not applied yet; return how many."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",  # an offset past retention restarts at the oldest record
    )
    await consumer.start()
    applied = 0
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]  # last stable offset: committed records only
        start = store.next_changelog_offset
        if start > end:
            raise StoreAheadOfChangelogError(
                f"store of {tp} is at offset {start}, the changelog ends at {end}"
            )
        if start == end:
            return 0
        consumer.seek(tp, start)
        while await consumer.position(tp) < end:
            # Short waits: the last offsets before ``end`` are often transaction markers, which
            # move the position without returning a record (a long wait would idle here).
            batch = await consumer.getmany(tp, timeout_ms=50, max_records=RESTORE_BATCH)
            for record in batch.get(tp, []):
                if record.offset >= end:
                    break
                if record.value:
                    store.apply(decode_marks(record.value), record.offset + 1)
                    applied += 1
        log.info("meter: restored %d changelog records of %s (offsets %d..%d)", applied, tp, start, end)
        return applied
    finally:
        await consumer.stop()
