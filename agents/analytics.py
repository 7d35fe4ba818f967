"""Analytics: ``usage.accepted``, ``charges`` and ``usage.rejected`` -> ClickHouse.

Per input partition, records collect into a batch that is inserted as ONE block once it holds
``analytics_batch_rows`` rows or is ``analytics_batch_interval`` old. Rows are never decoded in
Python: a usage.accepted or charges message already is a JSON array of rows, and the batch is
those arrays joined (``sinks.clickhouse``); a dead letter becomes one row built from its headers.

Exactly-once into ClickHouse, per partition batch, in this order (each step's guarantee):
1. freeze the batch: offsets ``start`` (the committed offset it continues from) to ``last``; new
   records start the next batch;
2. commit ``start`` again, with ``pending:<last>`` as the offset's metadata: whoever owns the
   partition next (this worker after a crash, or another after a rebalance) knows the exact range
   of the batch that may be in ClickHouse already, and cuts its first batch to end at ``last``;
3. insert with the token ``<topic>:<partition>:<start>-<last>``: the table and every rollup drop
   a block whose token they stored within their last 10,000 blocks, so the re-cut batch of step
   2, inserted again, is written once;
4. commit ``last + 1`` (no metadata): the batch is done.
A crash between any two steps replays at most the pending batch, with the same token.

Backpressure: an insert that fails for any reason but the rows themselves (ClickHouse down, slow,
out of parts) pauses every partition, keeps the batch and its uncommitted offsets, and retries it
with the same token, waiting ``analytics_retry_min`` doubling to ``analytics_retry_max``; the
consumer keeps polling (nothing, while paused) so it stays in its group. When an insert succeeds
the partitions resume. A batch whose partition a rebalance moved is not written (its next owner
re-cuts it from the commit metadata); a pending range that cannot be committed, or a rebalance
whose committed offsets cannot be read, restarts the agent from the commits.

Rows the engine refuses (a foreign producer's message on these topics) are found by inserting the
batch message by message (tokens ``...:<offset>``: a replay splits the same way) and
dead-lettered with reason ``schema_violation``, the rest written; a batch of which every message
is refused is the engine failing, not the data, and is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from agents.config import AgentSettings
from agents.health import HealthSampler, stage_groups
from schemas.rejections import MAX_DEAD_LETTER_BYTES, Reason, Rejection, Stage
from sinks.clickhouse import BadRowsError, ClickHouseSink

log = logging.getLogger(__name__)

PENDING = "pending:"
# How a message's rows are counted without decoding it: each row has this key once (ingest's
# normalized events start with specversion; charges with charge_id). A row count only sizes
# batches, so a rare miscount changes when a batch is cut, never what it holds.
ROW_MARKERS = {"usage_events": b'"specversion"', "charges": b'"charge_id"'}
_json = msgspec.json.Encoder()


def analytics_group(settings: AgentSettings) -> str:
    return settings.group_id("analytics")


def analytics_topics(settings: AgentSettings) -> list[str]:
    return stage_groups(settings)[analytics_group(settings)]


def table_of(settings: AgentSettings) -> dict[str, str]:
    return {
        settings.topic_accepted: "usage_events",
        settings.topic_charges: "charges",
        settings.topic_rejected: "rejections",
    }


def rejection_row(record: ConsumerRecord[bytes, bytes]) -> bytes:
    """A dead letter as a ``rejections`` row (a one-row JSON array), from its headers."""
    headers = {name: (value or b"").decode(errors="replace") for name, value in record.headers}
    row = {
        "time": datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat(),
        "reason": headers.get("tally.reason", "unknown"),
        "stage": headers.get("tally.stage", "unknown"),
        "origin": headers.get("tally.origin", f"{record.topic}/{record.partition}/{record.offset}"),
        "detail": headers.get("tally.detail", ""),
        "size_bytes": len(record.value or b""),
    }
    return _json.encode([row])


@dataclass(slots=True)
class Batch:
    """One partition's records for one insert: offsets ``start`` .. ``last``."""

    start: int
    opened: float  # time.monotonic() of its first record
    arrays: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    row_counts: list[int] = field(default_factory=list)  # per message, to split at a re-cut
    last: int = -1
    rows: int = 0  # their sum, kept as records come (freeze_due reads it every poll)

    def token(self, tp: TopicPartition) -> str:
        return f"{tp.topic}:{tp.partition}:{self.start}-{self.last}"


@dataclass(slots=True)
class PartitionState:
    """Where a partition stands: the committed offset the open batch continues from, a pending
    range to re-cut (from the commit metadata), the open batch and the frozen one in flight."""

    committed: int | None
    cut_at: int | None = None
    open: Batch | None = None
    frozen: Batch | None = None


class Batcher:
    """The batching rules (pure: no I/O, the time passed in)."""

    def __init__(self, tables: dict[str, str], max_rows: int, max_age_s: float) -> None:
        self.tables = tables
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.partitions: dict[TopicPartition, PartitionState] = {}

    def assign(self, tp: TopicPartition, committed: OffsetAndMetadata | None) -> None:
        state = PartitionState(committed.offset if committed is not None and committed.offset >= 0 else None)
        if committed is not None and committed.metadata.startswith(PENDING):
            state.cut_at = int(committed.metadata.removeprefix(PENDING))
        self.partitions[tp] = state

    def revoke(self, tp: TopicPartition) -> None:
        self.partitions.pop(tp, None)

    def add(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], now: float) -> None:
        state = self.partitions.get(tp)
        if state is None:
            return  # revoked during the poll
        batch = state.open
        if batch is not None and batch.offsets:
            expected: int | None = batch.last + 1
        elif state.frozen is not None:
            expected = state.frozen.last + 1
        else:
            expected = state.committed
        if expected is not None and record.offset < expected:
            return  # fetched before a rebalance re-seek: already in this or an earlier batch
        if batch is None:
            start = state.committed if state.committed is not None else record.offset
            batch = state.open = Batch(start, now)
        table = self.tables[tp.topic]
        if table == "rejections":
            value, rows = rejection_row(record), 1
        else:
            value = record.value or b""
            rows = max(1, value.count(ROW_MARKERS[table]))
        batch.arrays.append(value)
        batch.offsets.append(record.offset)
        batch.row_counts.append(rows)
        batch.rows += rows
        batch.last = record.offset

    def freeze_due(self, now: float, everything: bool = False) -> dict[TopicPartition, Batch]:
        """Freeze the open batches that are full, old or end at their pending cut (all of them
        with ``everything``); each becomes its partition's batch in flight."""
        frozen = {}
        for tp, state in self.partitions.items():
            batch = state.open
            if batch is None or state.frozen is not None or not batch.offsets:
                continue
            if state.cut_at is not None:
                if batch.last < state.cut_at:
                    continue  # a pending range is re-cut exactly: wait for all of it
                batch = self._split_at(state, batch, state.cut_at)
            elif not (everything or batch.rows >= self.max_rows or now - batch.opened >= self.max_age_s):
                continue
            else:
                state.open = None
            state.frozen = frozen[tp] = batch
        return frozen

    @staticmethod
    def _split_at(state: PartitionState, batch: Batch, cut_at: int) -> Batch:
        keep = sum(1 for offset in batch.offsets if offset <= cut_at)
        head = Batch(
            batch.start, batch.opened, batch.arrays[:keep], batch.offsets[:keep], batch.row_counts[:keep]
        )
        head.last, head.rows = cut_at, sum(head.row_counts)
        rest = Batch(
            cut_at + 1, batch.opened, batch.arrays[keep:], batch.offsets[keep:], batch.row_counts[keep:]
        )
        rest.last = rest.offsets[-1] if rest.offsets else -1
        rest.rows = sum(rest.row_counts)
        state.open = rest if rest.offsets else None
        state.cut_at = None
        return head

    def in_flight(self, tp: TopicPartition, batch: Batch) -> bool:
        """Whether ``batch`` still is ``tp``'s batch in flight (a rebalance replaces the state)."""
        state = self.partitions.get(tp)
        return state is not None and state.frozen is batch

    def done(self, tp: TopicPartition, batch: Batch) -> None:
        state = self.partitions.get(tp)
        if state is None or state.frozen is not batch:
            return
        state.frozen = None
        state.committed = batch.last + 1
        if state.open is not None:
            state.open.start = state.committed


class RestartError(RuntimeError):
    """The agent's view of its partitions is unreliable: it restarts from the committed offsets."""


class EngineRefusedEverythingError(RuntimeError):
    """Every message of a batch was refused as bad rows: handled as ClickHouse failing."""


class AnalyticsSink:
    """The I/O side: inserts a frozen batch, bisecting refused rows into dead letters."""

    def __init__(self, sink: ClickHouseSink, tables: dict[str, str]) -> None:
        self.sink = sink
        self.tables = tables

    def insert(self, tp: TopicPartition, batch: Batch) -> list[Rejection]:
        """Insert ``batch``; return the messages the engine refused (the rest is written)."""
        table = self.tables[tp.topic]
        try:
            self.sink.insert(table, batch.arrays, batch.token(tp))
            return []
        except BadRowsError:
            pass
        refused: list[Rejection] = []
        for offset, array in zip(batch.offsets, batch.arrays, strict=True):
            try:
                self.sink.insert(table, [array], f"{batch.token(tp)}:{offset}")
            except BadRowsError as exc:
                origin = f"{tp.topic}/{tp.partition}/{offset}"
                detail = f"ClickHouse refused the rows of {table}: {str(exc)[:500]}"
                refused.append(Rejection(Reason.SCHEMA_VIOLATION, detail, array, origin, Stage.ANALYTICS))
        if len(refused) == len(batch.arrays) > 1:
            # Every message refused: the engine is failing, not the data (the meter wrote it).
            raise EngineRefusedEverythingError(f"ClickHouse refused every message of {batch.token(tp)}")
        return refused


# The shell: consumer, commits, backpressure --------------------------------------------------


class AnalyticsAgent:
    """Runs for the worker's lifetime (``pipeline.app``). ``client`` is opened by the caller: with
    the embedded engine only the worker that holds the chdb path runs this agent."""

    def __init__(self, settings: AgentSettings, sink: ClickHouseSink) -> None:
        self.settings = settings
        self.tables = table_of(settings)
        self.batcher = Batcher(
            self.tables, settings.analytics_batch_rows, settings.analytics_batch_interval.total_seconds()
        )
        self.writer = AnalyticsSink(sink, self.tables)
        self.sink = sink
        self.counters: dict[str, int] = {"rows": 0, "batches": 0, "retries": 0, "dead_letters": 0}
        self.paused = False
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._failure: Exception | None = None

    def stop(self) -> None:
        self._stopping.set()

    def _take(self, polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        if self._failure is not None:  # the rebalance listener failed: restart from the commits
            raise self._failure
        now = time.monotonic()
        for tp, records in polled.items():
            for record in records:
                self.batcher.add(tp, record, now)

    async def run(self) -> None:
        settings = self.settings
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=analytics_group(settings),
            client_id=f"{analytics_group(settings)}-{settings.worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # aborted transactions never reach ClickHouse
            max_partition_fetch_bytes=settings.fetch_partition_bytes,
            fetch_max_bytes=settings.fetch_total_bytes,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.session_timeout_ms // 3,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_idempotence=True,
            max_request_size=MAX_DEAD_LETTER_BYTES,
        )
        admin = self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        await producer.start()
        await consumer.start()
        consumer.subscribe(analytics_topics(settings), listener=_Listener(self))
        sampler = asyncio.create_task(HealthSampler(settings, self.sink, admin, consumer).run())
        try:
            while not self._stopping.is_set():
                polled = await consumer.getmany(
                    timeout_ms=settings.poll_timeout_ms, max_records=settings.poll_max_records
                )
                self._take(polled)
                frozen = self.batcher.freeze_due(time.monotonic())
                if frozen:
                    await self._flush(consumer, producer, frozen)
            # Stopping: write what is buffered (one attempt each; what fails is re-read later).
            frozen = self.batcher.freeze_due(time.monotonic(), everything=True)
            if frozen:
                try:
                    await self._flush(consumer, producer, frozen)
                except Exception as exc:  # ClickHouse down at shutdown: re-read on start
                    log.warning("analytics: final flush failed (%r); the batches are re-read on start", exc)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            await admin.close()

    async def _flush(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, frozen: dict[TopicPartition, Batch]
    ) -> None:
        # Step 2: record each batch's range before writing it.
        try:
            await consumer.commit(
                {tp: OffsetAndMetadata(batch.start, f"{PENDING}{batch.last}") for tp, batch in frozen.items()}
            )
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance or the broker: inserting now could overlap the next owner's batches,
            # cut differently. The agent restarts and re-reads from the last commit.
            raise RestartError(f"could not record {len(frozen)} pending batches: {exc!r}") from exc
        # Step 3: insert, retried with the same token until ClickHouse takes it.
        written = {}
        for tp, batch in frozen.items():
            refused = await self._insert_until_written(consumer, tp, batch)
            if refused is None:
                continue  # the partition moved (a rebalance): its owner re-cuts this batch
            written[tp] = batch
            for rejection in refused:
                if tp.topic == self.settings.topic_rejected:
                    log.error(
                        "analytics: ClickHouse refused a dead-letter row %s: %s",
                        rejection.origin,
                        rejection.detail,
                    )
                    continue
                await producer.send_and_wait(
                    self.settings.topic_rejected, rejection.original, headers=rejection.headers()
                )
                self.counters["dead_letters"] += 1
            self.counters["rows"] += batch.rows
            self.counters["batches"] += 1
        # Step 4: the batches are written.
        if not written:
            return
        try:
            await consumer.commit(
                {tp: OffsetAndMetadata(batch.last + 1, "") for tp, batch in written.items()}
            )
        except (CommitFailedError, KafkaError) as exc:
            log.warning(
                "analytics: commit after insert failed (%r); the next owner re-inserts, deduplicated", exc
            )
        for tp, batch in written.items():
            self.batcher.done(tp, batch)

    async def _insert_until_written(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, batch: Batch
    ) -> list[Rejection] | None:
        """The messages ClickHouse refused once the batch is written; None when the partition's
        state moved on first (revoked, or reassigned with state read from the commits)."""
        wait = self.settings.analytics_retry_min.total_seconds()
        longest = self.settings.analytics_retry_max.total_seconds()
        while True:
            if not self.batcher.in_flight(tp, batch):
                return None
            try:
                refused = await asyncio.to_thread(self.writer.insert, tp, batch)
            except Exception as exc:  # any failure but refused rows: ClickHouse unavailable or slow
                if not self.paused:
                    log.warning(
                        "analytics: ClickHouse insert failed (%s); pausing input, retrying", str(exc)[:300]
                    )
                    consumer.pause(*consumer.assignment())
                    self.paused = True
                self.counters["retries"] += 1
                if self._stopping.is_set():
                    raise
                # Poll while waiting so the group keeps this member: paused partitions return
                # nothing, and what a partition assigned meanwhile returned is batched, not lost.
                self._take(await consumer.getmany(timeout_ms=int(wait * 1000)))
                wait = min(wait * 2, longest)
                continue
            if self.paused:
                consumer.resume(*consumer.assignment())
                self.paused = False
                log.info("analytics: ClickHouse is back; input resumed")
            return refused


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information here
    def __init__(self, agent: AnalyticsAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.agent.batcher.revoke(tp)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        agent = self.agent
        assert agent._admin is not None and agent._consumer is not None
        try:
            committed = await agent._admin.list_consumer_group_offsets(
                analytics_group(agent.settings), partitions=sorted(assigned)
            )
            for tp in assigned:
                # The admin client drops a response-level error as "nothing committed": a
                # partition it says was never committed is checked with the consumer's own fetch.
                if tp not in committed and await agent._consumer.committed(tp) is not None:
                    raise RestartError(f"offsets of {tp} unreadable through the admin client")
                agent.batcher.assign(tp, committed.get(tp))
        except Exception as exc:  # aiokafka logs and swallows a listener's exceptions
            agent._failure = exc
            return
        if agent.paused:  # a rebalance during an outage: new partitions wait too
            agent._consumer.pause(*assigned)
