"""The exactly-once loop every Kafka-to-Kafka stage runs on (why not Faust's: docs/ARCHITECTURE.md).

A stage reads its input topic with aiokafka ``getmany`` and, per input partition and poll, writes
everything that batch caused (outputs, dead letters, state changelog) and the consumed offsets in
one Kafka transaction. A crash at any point either commits all of it or none of it, so the stage
neither loses nor repeats its output.

Order of steps per input partition and poll, and the guarantee each gives:
1. ``task.process(records)``: pure work, no I/O. Nothing is visible yet; a crash here replays the
   batch from the last committed offset.
2. ``begin_transaction`` on the partition's own producer. Its transactional id is
   ``<app>-<stage>-<topic>-<partition>``, so the worker that gets the partition next fences this
   one (``init_transactions`` bumps the epoch): a stalled worker that lost the partition can no
   longer commit, even though aiokafka 0.14 lacks KIP-447's group-generation fencing.
3. ``send`` every output record and await the acks. Still invisible to read-committed readers.
4. ``send_offsets_to_transaction``: the input offsets become part of the same transaction.
5. ``commit_transaction``: outputs, changelog and offsets become visible atomically. This is the
   commit point; before it, a crash aborts everything (the broker times the transaction out or the
   next owner's fencing aborts it).
6. ``task.committed(...)``: only now is local state (the RocksDB cache of the changelog) updated,
   with the changelog offset it reflects. A crash between 5 and 6 is repaired on restart by
   replaying the changelog tail; local state never holds an uncommitted change. The write runs
   on the event loop's thread, under the lock, so the partition's next poll never reads a
   half-applied store.

Rebalances: the revocation callback takes the same lock as steps 1-6, so a partition is handed
over only between transactions; a poll that straddled a rebalance is dropped (its records are
fetched again from the committed offsets) rather than processed against a stale assignment.
If a transaction fails (fenced, broker error), it is aborted, the partition is rewound to its
first uncommitted record, and its task is reopened from the changelog.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.structs import ConsumerRecord, RecordMetadata

from agents.config import AgentSettings
from schemas.rejections import MAX_DEAD_LETTER_BYTES

log = logging.getLogger(__name__)

# Pause before retrying a partition whose transaction failed for a reason other than fencing.
RETRY_DELAY_S = 1.0
# How often idle partitions get their ``tick`` (closing windows by the wall clock).
TICK_INTERVAL_S = 1.0
# Tries to open a partition (fence + restore) before the worker gives up and stops.
OPEN_ATTEMPTS = 5

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Outgoing:
    topic: str
    value: bytes
    partition: int | None = None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    """What one poll of one partition produced. ``state`` is handed back to ``committed``."""

    messages: list[Outgoing]
    state: Any = None
    counters: dict[str, int] = field(default_factory=dict)


class RetryLaterError(Exception):
    """A task could not complete its work for a passing reason (a sink is down). The loop treats
    it like a failed transaction: nothing is committed, the partition rewinds and is retried."""


class PartitionTask(Protocol):
    """The stage's logic for one input partition."""

    def process(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], now: datetime
    ) -> Outcome | Awaitable[Outcome]:
        """Pure work returns its outcome; a task whose work blocks (a sink's write) returns an
        awaitable that runs it off the event loop, which must keep heartbeating meanwhile."""
        ...

    def committed(self, outcome: Outcome, metadata: Sequence[RecordMetadata]) -> None:
        """Apply the committed outcome to local state, before this partition's next ``process``."""
        ...

    def tick(self, now: datetime) -> Outcome | None:
        """Work due without input (closing windows of an idle partition), or None."""
        ...

    def close(self) -> None: ...


class StatelessTask:
    """Base of tasks that keep no local state and have no work without input (the ledger):
    nothing to apply after a commit, no tick, nothing to close."""

    def committed(self, outcome: Outcome, metadata: Sequence[RecordMetadata]) -> None:
        return None

    def tick(self, now: datetime) -> Outcome | None:
        return None

    def close(self) -> None:
        return None


class Stage(Protocol):
    name: str
    input_topic: str

    async def open_task(self, partition: int) -> PartitionTask:
        """Ready the task of a newly assigned partition (restoring its state, if it has any)."""
        ...


class TransactionalLoop:
    """Runs one stage: consumer group ``<app>-<stage>``, a transactional producer per partition."""

    def __init__(self, settings: AgentSettings, stage: Stage, clock: Clock = utc_now) -> None:
        self.settings = settings
        self.stage = stage
        self.clock = clock
        self.group_id = settings.group_id(stage.name)
        self.counters: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._generation = 0
        self._tasks: dict[TopicPartition, PartitionTask] = {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._opening: dict[TopicPartition, asyncio.Task[None]] = {}
        self._failure: Exception | None = None
        self._ticked_at = 0.0

    # Lifecycle ----------------------------------------------------------------------------------

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.group_id,
            client_id=f"{self.group_id}-{self.settings.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # The broker checked every batch's CRC when it was produced, and TCP checksums the
            # wire: a second check here cost ~2% of a worker's CPU (librdkafka skips it too).
            check_crcs=False,
            max_partition_fetch_bytes=self.settings.fetch_partition_bytes,
            fetch_max_bytes=self.settings.fetch_total_bytes,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=self.settings.session_timeout_ms // 3,
        )
        self._consumer = consumer
        await consumer.start()
        consumer.subscribe([self.stage.input_topic], listener=_Listener(self._on_revoked, self._on_assigned))
        try:
            while not self._stopping.is_set():
                generation = self._generation
                batches = await consumer.getmany(
                    timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.poll_max_records
                )
                if self._failure is not None:
                    raise self._failure
                if not batches:
                    await self._tick(batches)
                    continue
                async with self._lock:
                    if generation != self._generation:
                        # A rebalance ran during the poll: drop these records and fetch again
                        # from the committed offsets (another worker may have moved them on).
                        for tp, records in batches.items():
                            if tp in self._tasks:
                                await self._rewind(tp, records[0].offset)
                        continue
                    await asyncio.gather(
                        *(self._transact(tp, records) for tp, records in batches.items() if tp in self._tasks)
                    )
                await self._tick(batches)
        finally:
            async with self._lock:
                await self._cancel_opening()
                await self._close_partitions(set(self._tasks))
            await consumer.stop()

    def stop(self) -> None:
        self._stopping.set()

    # One transaction --------------------------------------------------------------------------

    async def _tick(self, polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        """At most once per ``TICK_INTERVAL_S``, give each partition that had no input in this
        poll its ``tick``; what it returns is committed like a poll's outcome, with no offsets."""
        now = asyncio.get_running_loop().time()
        if now - self._ticked_at < TICK_INTERVAL_S:
            return
        self._ticked_at = now
        async with self._lock:
            for tp in [tp for tp in self._tasks if tp not in polled]:
                if tp in self._tasks:  # a failed transaction of an earlier one may close it
                    await self._transact(tp, [])

    async def _transact(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """One poll's records of ``tp`` (or, without records, its tick) in one transaction."""
        task = self._tasks[tp]
        producer = self._producers[tp]
        try:
            if records:
                result = task.process(records, self.clock())  # step 1
                outcome = await result if inspect.isawaitable(result) else result
            else:
                ticked = task.tick(self.clock())
                if ticked is None:
                    return
                outcome = ticked
        except RetryLaterError as exc:
            log.warning("%s: %s; retrying %s in %.0f s", self.stage.name, exc, tp, RETRY_DELAY_S)
            assert self._consumer is not None
            self._consumer.pause(tp)
            await self._rewind(tp, records[0].offset if records else None)
            await self._close_partitions({tp})
            self._open_in_background(tp, self._generation, RETRY_DELAY_S)
            return
        try:
            async with producer.transaction():  # steps 2 and 5
                futures = [
                    await producer.send(m.topic, m.value, key=m.key, partition=m.partition, headers=m.headers)
                    for m in outcome.messages
                ]
                metadata = await asyncio.gather(*futures)  # step 3
                if records:
                    await producer.send_offsets_to_transaction(  # step 4
                        {tp: records[-1].offset + 1}, self.group_id
                    )
        except KafkaError as exc:
            # Rewind to the committed offset (not to this batch: if the commit went through
            # after all, that would replay it), stop fetching the partition, and take it up
            # again later: at once would fight a new owner that fenced us, so a fenced worker
            # waits a session timeout for the rebalance that hands the partition over.
            fenced = isinstance(exc, ProducerFenced | InvalidProducerEpoch)
            log.warning(
                "%s: transaction for %s failed (%r); rewinding to its committed offset",
                self.stage.name,
                tp,
                exc,
            )
            assert self._consumer is not None
            self._consumer.pause(tp)
            await self._rewind(tp, records[0].offset if records else None)
            await self._close_partitions({tp})
            delay = self.settings.session_timeout_ms / 1000 if fenced else RETRY_DELAY_S
            self._open_in_background(tp, self._generation, delay)
            return
        task.committed(outcome, metadata)  # step 6
        for name, count in outcome.counters.items():
            self.counters[name] = self.counters.get(name, 0) + count

    async def _rewind(self, tp: TopicPartition, first_fetched: int | None) -> None:
        """Move the position back to the group's committed offset, or, where nothing was ever
        committed, to the first record fetched (``seek_to_committed`` would not move it then).
        After a tick nothing was fetched: the position has not moved past the committed offset."""
        assert self._consumer is not None
        committed = await self._consumer.committed(tp)
        if committed is not None:
            self._consumer.seek(tp, committed)
        elif first_fetched is not None:
            self._consumer.seek(tp, first_fetched)

    # Rebalance ----------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Waits for the transaction in flight: a partition changes hands between transactions.
        async with self._lock:
            self._generation += 1

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # Quick on purpose: aiokafka sends no heartbeats until this returns, and restoring a
        # partition's state can take longer than the session timeout. New partitions are paused
        # here and opened (fenced, restored) in the background, then resumed.
        async with self._lock:
            self._generation += 1
            try:
                await self._cancel_opening()  # begun for an older generation: start again
                await self._close_partitions(set(self._tasks) - assigned)
                assert self._consumer is not None
                for tp in sorted(assigned - set(self._tasks)):
                    self._consumer.pause(tp)
                    self._open_in_background(tp, self._generation)
            except Exception as exc:
                # aiokafka would only log this and carry on with partitions nobody processes:
                # hand it to the loop, which raises it and so stops the worker.
                self._failure = exc
                raise

    def _open_in_background(self, tp: TopicPartition, generation: int, delay: float = 0.0) -> None:
        task = asyncio.get_running_loop().create_task(self._open(tp, generation, delay))
        self._opening[tp] = task
        task.add_done_callback(
            lambda done: self._opening.pop(tp, None) if self._opening.get(tp) is done else None
        )

    async def _open(self, tp: TopicPartition, generation: int, delay: float, attempt: int = 1) -> None:
        """Fence the partition's previous owner, open its task (restoring state), then install
        both and resume fetching, if the assignment is still the one this began under."""
        await asyncio.sleep(delay)
        producer = self._new_producer(tp)
        task: PartitionTask | None = None
        try:
            await producer.start()  # init_transactions: fences the partition's previous owner
            task = await self.stage.open_task(tp.partition)
            async with self._lock:
                assert self._consumer is not None
                current = generation == self._generation and tp in self._consumer.assignment()
                if current:
                    # From the committed offset (where there is one) read now, after the fence:
                    # a stalled former owner may have committed since the assignment began.
                    await self._consumer.seek_to_committed(tp)
                    self._producers[tp], self._tasks[tp] = producer, task
                    self._consumer.resume(tp)
        except BaseException as exc:
            if task is not None:
                task.close()
            await producer.stop()
            if isinstance(exc, asyncio.CancelledError):
                return  # a newer assignment took over; it opens the partition again if it is ours
            if attempt >= OPEN_ATTEMPTS or not isinstance(exc, Exception):
                log.exception("%s: could not open %s; stopping the worker", self.stage.name, tp)
                self._failure = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                return
            log.warning(
                "%s: opening %s failed (%r), attempt %d of %d",
                self.stage.name,
                tp,
                exc,
                attempt,
                OPEN_ATTEMPTS,
            )
            await self._open(tp, generation, RETRY_DELAY_S * attempt, attempt + 1)
            return
        if current:
            log.info("%s: took partition %s", self.stage.name, tp)
        else:  # stale: the assignment changed while this opened; the next one opens it again
            task.close()
            await producer.stop()

    def _new_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"{self.group_id}-{self.settings.worker_id}-{tp.partition}",
            transactional_id=f"{self.group_id}-{tp.topic}-{tp.partition}",
            transaction_timeout_ms=self.settings.transaction_timeout_ms,
            enable_idempotence=True,
            acks="all",
            # zstd (level 3, in cramjam's C): ~8x smaller batches of normalized events, compressed
            # at ~650 MB/s and read back at ~1 GB/s here, against asyncio's and aiokafka's
            # per-byte Python work on every batch (~25% of a worker's CPU uncompressed):
            # bench/meter batch 62,411 / 63,284 events/s with it, 56,487 / 58,311 without, in
            # alternating runs. Not snappy (aiokafka frames it in Python: 8% of a worker's CPU)
            # nor lz4 (aiokafka runs level 9: 127 MB/s).
            compression_type="zstd",
            linger_ms=5,
            max_batch_size=1024 * 1024,
            max_request_size=MAX_DEAD_LETTER_BYTES + 64 * 1024,  # a whole dead letter fits
        )

    async def _cancel_opening(self) -> None:
        opening = list(self._opening.values())
        self._opening.clear()
        for task in opening:
            task.cancel()
        # Their clean-up (closing stores and producers) runs before new opens of the same
        # partitions, which would otherwise find the RocksDB store locked.
        await asyncio.gather(*opening, return_exceptions=True)

    async def _close_partitions(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            task = self._tasks.pop(tp)
            task.close()
            await self._producers.pop(tp).stop()
            log.info("%s: released partition %s", self.stage.name, tp)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information here
    def __init__(
        self,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        on_assigned: Callable[[set[TopicPartition]], Awaitable[None]],
    ) -> None:
        self._revoked = on_revoked
        self._assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._assigned(set(assigned))
