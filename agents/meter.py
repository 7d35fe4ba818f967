"""Meter: ``usage.raw`` -> ``usage.accepted`` + ``charges`` (shell: ingest, dedupe, window, rate).

The logic is pure: ``agents.ingest`` (validate, normalize, route), ``agents.dedupe`` (identity
marks) and ``agents.window`` (windows, rating). This shell gives them a RocksDB store per input
partition (``sinks.statestore``) and ONE changelog topic, and runs on the exactly-once loop
(``agents.transactional``), so per poll and partition one Kafka transaction holds: the accepted
batch (to the same partition number of ``usage.accepted``: the topics are all partitioned by
account), the charges of the windows the poll closed (to ``charges``, same partition number), the
dead letters (ingest's reasons, ``id_conflict``, ``too_late``, ``unpriced``), the events that came
in on another account's partition (forwarded, normalized, to that account's partition of
``usage.raw``), ONE changelog message with every state change of the poll (new marks, open and
closed windows, period usage, watermark), and the consumed offsets.

Why ingest is a step here and not a stage of its own (``usage.raw -> [ingest] -> usage.valid ->
[meter]``; docs/ARCHITECTURE.md): producers key ``usage.raw`` by account with Kafka's default
partitioner, the same one ingest routes by, so nearly every event is already on its meter's
partition. A hop through ``usage.valid`` cost every event a produce, a fetch and a decode on the
worker's thread: bench/meter batch read 69,983 events/s without that hop against 61,609 with it,
in the same hour.
A forwarded event is validated again by its account's partition (it is normalized, so it passes
the same way) and deduped there like any event; it cannot be forwarded twice (the partition count
is the same at both ends).

Where each step runs: the per-event work (ingest's checks and normalization, dedupe, adding usage
to windows) is compiled, ``tally_native.MeterCore`` over ``tally_native.WindowCore``
(native/src), for every message it can read as it is (what Tally's producer and well-behaved
clients send); a message it declines (a bad event in it, escapes, unusual number or time forms)
is validated by the Python ingest core, which has the last word on every reason, and its
accepted records go on through the same native dedupe and windows, in Kafka order. Closing and
rating windows (once per charge row) is Python (``agents.window``). bench/meter measured the move
in one hour: batch messages 93,681 -> 131,279 events/s, median of 3 (bench/README.md).

Order of steps, and the guarantee each gives:
1. on assignment, ``restore``: replay the changelog partition from the offset the local store
   recorded to its last committed record; then load the open windows and the watermark from it.
   The store then holds every change committed by any worker.
2. ``process``: ingest the poll's records; dedupe this partition's events against pending marks,
   then the store; add each accepted event to its window (or reject it); close the windows the
   watermark passed and rate them. All changes are pending.
3. the loop commits the transaction (outputs + charges + changelog + offsets) - the commit point.
4. ``committed``: the pending changes and the changelog offset after them go into the store in one
   atomic write, before the partition's next poll is processed (on the loop's thread: RocksDB's
   write holds the GIL, ``sinks.statestore``). A crash before 4 is repaired by 1 on the next
   start; a failed transaction drops the task (its in-memory windows included) and reopens it
   from the store and changelog.
So an event is marked seen, added to its window, and its window's charges are published in the
same commit - never one without the others. Idle partitions: ``tick`` closes windows by the wall
clock, in a transaction of its own (changelog + charges, no offsets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata
from tally_native import MeterCore, PollOutput

from agents.config import AgentSettings
from agents.dedupe import MARKS_RECORD_BYTES, decode_marks, encode_marks
from agents.ingest import MAX_QUANTITY, IngestCore, epoch_micros, ingest_core, rejection_message
from agents.plans import Plans
from agents.transactional import Outcome, Outgoing
from agents.window import WindowConfig, WindowResult, Windows
from agents.window_state import Stored
from schemas.charges import charges_encoder
from schemas.events import BATCH_CONTENT_TYPE, MAX_BATCH_BYTES, cut_by_size, encode_batch
from schemas.rejections import Reason, Rejection, Stage, rejection_counters
from sinks.statestore import PartitionStore, Store

log = logging.getLogger(__name__)

# Changelog records read per restore poll.
RESTORE_BATCH = 10_000


def meter_changelog_topic(settings: AgentSettings) -> str:
    return f"{settings.app_id}-meter-changelog"


def window_config(settings: AgentSettings) -> WindowConfig:
    return WindowConfig(
        size=int(settings.window_size.total_seconds()),
        grace=int(settings.window_grace.total_seconds()),
        horizon=int(settings.dedupe_horizon.total_seconds()),
        idle_timeout=int(settings.session_idle_timeout.total_seconds()),
    )


class MeterTask:
    def __init__(
        self,
        settings: AgentSettings,
        partition: int,
        store: Store,
        plans: Plans,
        ingest: IngestCore,
    ) -> None:
        self.partition = partition
        self.store = store
        self.plans = plans
        self.ingest = ingest
        self.input_topic = settings.topic_raw
        self.accepted_topic = settings.topic_accepted
        self.rejected_topic = settings.topic_rejected
        self.charges_topic = settings.topic_charges
        self.changelog_topic = meter_changelog_topic(settings)
        self.origin_prefix = f"{settings.topic_raw}/{partition}/"
        # Forwarded events are a CloudEvents batch, as a producer would send it, saying where from.
        self.forward_headers = [
            ("content-type", BATCH_CONTENT_TYPE.encode()),
            ("tally.forwarded-from", f"{settings.topic_raw}/{partition}".encode()),
        ]
        self.idle_close = settings.window_idle_close.total_seconds()
        self.windows = Windows(window_config(settings), plans, store.get, Stored.load(store))
        self.core = MeterCore(
            self.windows.core,
            partition,
            settings.partitions,
            ingest.policy.max_message_bytes,
            ingest.policy.max_event_bytes,
            MAX_BATCH_BYTES,
            MARKS_RECORD_BYTES,
            ingest.policy.known_accounts,
            str(MAX_QUANTITY),
            store.get,
            store.get_many,
        )
        self._last_input = time.monotonic()

    def process(self, records: Sequence[ConsumerRecord[bytes, bytes]], now: datetime) -> Outcome:
        self._last_input = time.monotonic()
        self.plans.refresh()
        bounds = self.ingest.bounds(now)
        self.core.begin(epoch_micros(bounds.earliest), epoch_micros(bounds.latest), self.plans.generation)
        rejected: list[tuple[int, Rejection]] = []  # (offset, rejection)
        declined = 0
        # The native core takes records until one it declines; the Python ingest core judges
        # that one, and the native core goes on after it.
        start = self.core.ingest(records, 0)
        while start < len(records):
            declined += 1
            self._ingest_declined(records[start], now, rejected)
            start = self.core.ingest(records, start + 1)
        poll = self.core.take()
        rejected.extend(
            (offset, _reject(Reason(reason), detail, raw, f"{self.origin_prefix}{offset}"))
            for reason, detail, raw, offset in poll.rejections
        )
        # Dead letters in Kafka order: a message's ingest reasons, then dedupe's and the windows';
        # after them the usage of closed windows that could not be priced.
        in_order = [rejection for _, rejection in sorted(rejected, key=lambda pair: pair[0])]
        outcome = self._outcome(poll, in_order, self.windows.close(now))
        outcome.counters["records"] = len(records)
        outcome.counters["declined"] = declined
        return outcome

    def _ingest_declined(
        self, record: ConsumerRecord[bytes, bytes], now: datetime, rejected: list[tuple[int, Rejection]]
    ) -> None:
        """Validate one message in Python (agents/ingest.py); its accepted records go on through
        the native dedupe and windows (or are forwarded), its rejections into ``rejected``."""
        ingested = self.ingest.new_result(now)
        self.ingest.process(record.value, f"{self.origin_prefix}{record.offset}", ingested)
        rejected.extend((record.offset, rejection) for rejection in ingested.rejected)
        for partition, accepted in ingested.accepted.drain():
            self.core.accept(
                partition, [(key, print_, body) for key, print_, body, _ in accepted], record.offset
            )

    def tick(self, now: datetime) -> Outcome | None:
        """Close windows by the wall clock once the partition has been idle ``idle_close`` s."""
        # Plans keep being read while the partition is idle (the call never waits), so the next
        # poll with records is rated with plans no older than ``plans_refresh``.
        self.plans.refresh()
        if not len(self.windows.core) or time.monotonic() - self._last_input < self.idle_close:
            return None
        self.windows.core.begin_poll(self.plans.generation)
        closed = self.windows.close(now, wall_clock=int(now.timestamp()))
        if not closed.changes:
            return None
        return self._outcome(None, [], closed)

    def _outcome(self, poll: PollOutput | None, rejected: list[Rejection], closed: WindowResult) -> Outcome:
        """One poll's messages: changelog records first (their metadata leads in ``committed``),
        then the accepted batch, the charges, the dead letters and the forwarded events. Every
        message is cut to a bounded size (one poll can bring ~20 MiB of events for a partition)."""
        rejected = [*rejected, *closed.rejected]
        mark_records = poll.mark_records if poll is not None else []
        changelog = [
            *mark_records,
            *encode_marks(closed.changes),
        ]  # disjoint keys: marks never start with NUL
        messages = [Outgoing(self.changelog_topic, record, partition=self.partition) for record in changelog]
        if poll is not None:
            messages.extend(Outgoing(self.accepted_topic, m, partition=self.partition) for m in poll.accepted)
        charges = [charges_encoder.encode(c) for c in closed.charges]
        messages.extend(
            Outgoing(self.charges_topic, encode_batch(chunk), partition=self.partition)
            for chunk in cut_by_size(charges)
        )
        messages.extend(rejection_message(self.rejected_topic, r) for r in rejected)
        if poll is not None:
            messages.extend(
                Outgoing(self.input_topic, m, partition=p, headers=self.forward_headers)
                for p, m in poll.forwarded
            )
        changes = [*(poll.marks if poll is not None else []), *closed.changes.items()]
        counters = {
            "accepted": poll.accepted_count if poll is not None else 0,
            "duplicates": poll.duplicates if poll is not None else 0,
            "forwarded": poll.forwarded_count if poll is not None else 0,
            "windows_closed": closed.closed,
            "adjustments": closed.adjustments,
            "charges": len(closed.charges),
            **rejection_counters(rejected),
        }
        return Outcome(messages, state=(changes, len(changelog)), counters=counters)

    def committed(self, outcome: Outcome, metadata: Sequence[RecordMetadata]) -> None:
        changes, changelog_records = outcome.state
        if changes:
            self.store.apply(changes, metadata[changelog_records - 1].offset + 1)

    def close(self) -> None:
        self.store.close()


def _reject(reason: Reason, detail: str, raw: bytes, origin: str) -> Rejection:
    return Rejection(reason=reason, detail=detail, original=raw, origin=origin, stage=Stage.METER)


class MeterStage:
    name = "meter"

    def __init__(self, settings: AgentSettings, plans: Plans) -> None:
        """``plans``: the plan directory every partition's task reads (one, with its connection:
        pipeline builds it, pipeline/plans.py)."""
        self.settings = settings
        self.input_topic = settings.topic_raw
        self.plans = plans
        self.ingest = ingest_core(settings)

    async def open_task(self, partition: int) -> MeterTask:
        path = self.settings.state_dir / "meter" / f"p{partition}"
        topic = meter_changelog_topic(self.settings)
        store = PartitionStore(path, ttl=mark_ttl(self.settings))
        try:
            await restore(self.settings, topic, partition, store)
        except StoreAheadOfChangelogError as exc:
            # The changelog was recreated or truncated: the store's state is not the truth any
            # more, and trusting it could drop new events as duplicates. Rebuild from the log.
            log.warning("meter: %s; rebuilding partition %d from the changelog", exc, partition)
            store.close()
            PartitionStore.destroy(path)
            store = PartitionStore(path, ttl=mark_ttl(self.settings))
            await restore(self.settings, topic, partition, store)
        except BaseException:
            store.close()
            raise
        await self.plans.load()
        return MeterTask(self.settings, partition, store, self.plans, self.ingest)


def mark_ttl(settings: AgentSettings) -> timedelta:
    """How long a mark lives: the horizon, plus the clock skew ingest tolerates and a day of
    backlog, so a copy that ingest still accepts always finds its mark (the changelog's retention
    is horizon + 1 day as well)."""
    return settings.dedupe_horizon + settings.future_tolerance + timedelta(days=1)


class StoreAheadOfChangelogError(RuntimeError):
    """The local store says it applied changelog records the changelog does not have."""


async def restore(settings: AgentSettings, topic: str, partition: int, store: PartitionStore) -> int:
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
