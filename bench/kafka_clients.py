"""bench/kafka_clients: what an exactly-once hop costs the worker's thread, aiokafka vs librdkafka.

Not a product path: it measures the Kafka client alone, to say what a move to a client whose
network, batching and compression run outside the GIL would be worth (bench/meter's worker spends
~25% of its thread in aiokafka). Over the same 1,000,000 events in 100-event batch messages of
``usage.raw`` (bench/meter's batch data), each client runs the loop Tally's stages run: consume a
poll (read-committed), produce one output per input message (the value plus a fifth: usage.valid
records are that much larger than the events), commit the offsets in the transaction, zstd on.
- aiokafka 0.14 as ``agents.transactional`` uses it: ``getmany``, a transactional producer per
  input partition, one transaction per partition and poll;
- confluent-kafka (librdkafka; installed with the bench's quix-streams peer): ``consume``, one
  transactional producer, one transaction per poll (KIP-447 group metadata).
Reported per client, median of 3 alternating runs: events/s, and CPU per event of the calling
thread (``time.thread_time``: the time a single-threaded Python worker would lose) and of the whole
process (librdkafka's own threads included). Results: ``bench/results/kafka-clients.json``
and the table in ``bench/README.md``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from confluent_kafka import Consumer, Producer

from bench.ingest import RESULTS, clean_stream, create_topic, machine, replace_table
from pipeline.loadgen import Expected, default_now, generate, publish
from pipeline.settings import REPO_ROOT
from pipeline.testing import isolated_settings
from pipeline.topics import create_topics, delete_topics_with_prefix

EVENTS = 1_000_000
EVENTS_PER_MESSAGE = 100
REPEATS = 3
POLL_RECORDS = 20_000
FETCH_PARTITION_BYTES = 4 * 1024 * 1024  # Tally's defaults (pipeline.settings)
FETCH_TOTAL_BYTES = 32 * 1024 * 1024

Measure = tuple[float, float, float]  # events/s, thread CPU us/event, process CPU us/event


def output_of(value: bytes) -> bytes:
    return value + value[: len(value) // 5]


class Clock:
    """Wall, thread and process time from the first poll with records."""

    def __init__(self) -> None:
        self.started: tuple[float, float, float] | None = None

    def start(self) -> None:
        if self.started is None:
            self.started = (time.perf_counter(), time.thread_time(), time.process_time())

    def stop(self) -> Measure:
        assert self.started is not None
        wall, thread, process = self.started
        return (
            EVENTS / (time.perf_counter() - wall),
            (time.thread_time() - thread) * 1e6 / EVENTS,
            (time.process_time() - process) * 1e6 / EVENTS,
        )


async def aiokafka_hop(bootstrap: str, source: str, target: str) -> Measure:
    group = f"bench-aiokafka-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        check_crcs=False,
        max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
        fetch_max_bytes=FETCH_TOTAL_BYTES,
    )
    await consumer.start()
    producers: dict[TopicPartition, AIOKafkaProducer] = {}
    clock, events = Clock(), 0

    async def transact(tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        producer = producers.get(tp)
        if producer is None:
            producer = producers[tp] = AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                transactional_id=f"{group}-{tp.partition}",
                enable_idempotence=True,
                acks="all",
                compression_type="zstd",
                linger_ms=5,
                max_batch_size=1024 * 1024,
                max_request_size=2 * 1024 * 1024,
            )
            await producer.start()
        async with producer.transaction():
            futures = [
                await producer.send(target, output_of(r.value or b""), partition=tp.partition)
                for r in records
            ]
            await asyncio.gather(*futures)
            await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, group)

    try:
        while events < EVENTS:
            batches = await consumer.getmany(timeout_ms=1000, max_records=POLL_RECORDS)
            if batches:
                clock.start()
            await asyncio.gather(*(transact(tp, records) for tp, records in batches.items()))
            events += sum(map(len, batches.values())) * EVENTS_PER_MESSAGE
        return clock.stop()
    finally:
        for producer in producers.values():
            await producer.stop()
        await consumer.stop()


def librdkafka_hop(bootstrap: str, source: str, target: str) -> Measure:
    group = f"bench-librdkafka-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
            "fetch.max.bytes": FETCH_TOTAL_BYTES,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{group}-tx",
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 5,
            "batch.size": 1024 * 1024,
            "message.max.bytes": 2 * 1024 * 1024,
        }
    )
    consumer.subscribe([source])
    producer.init_transactions()
    clock, events = Clock(), 0
    try:
        while events < EVENTS:
            records = consumer.consume(num_messages=POLL_RECORDS, timeout=1.0)
            if not records:
                continue
            clock.start()
            producer.begin_transaction()
            for record in records:
                producer.produce(target, output_of(record.value()), partition=record.partition())
            producer.send_offsets_to_transaction(
                consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
            )
            producer.commit_transaction()
            events += len(records) * EVENTS_PER_MESSAGE
        return clock.stop()
    finally:
        consumer.close()


def main() -> None:
    settings = isolated_settings(
        REPO_ROOT / ".data" / "bench" / "kafka-clients", accounts=100, accounts_file=None
    )
    asyncio.run(create_topics(settings))
    plan = clean_stream(EVENTS, 100, EVENTS_PER_MESSAGE, seed=11, span_s=900)  # bench/meter's batch data
    sent, seconds = asyncio.run(publish(settings, generate(plan, default_now(), Expected()), chunk=5_000))
    print(f"published {sent:,} events in {seconds:.1f} s", flush=True)
    hops: dict[str, Callable[[str, str, str], Measure]] = {
        "aiokafka": lambda *args: asyncio.run(aiokafka_hop(*args)),
        "librdkafka": librdkafka_hop,
    }
    runs: dict[str, list[Measure]] = {name: [] for name in hops}
    for repeat in range(REPEATS):
        for name, hop in hops.items():
            target = f"{settings.topic_raw}.{name}-{repeat}"
            asyncio.run(create_topic(settings, target))
            runs[name].append(hop(settings.kafka_bootstrap, settings.topic_raw, target))
            rate, thread, process = runs[name][-1]
            print(f"[{name}] run {repeat + 1}: {rate:,.0f} events/s, thread {thread:.2f} us/event, "
                  f"process {process:.2f} us/event", flush=True)  # fmt: skip
    asyncio.run(delete_topics_with_prefix(settings, settings.app_id))
    results = [
        {
            "name": f"kafka-clients-{name}",
            "client": name,
            "events_per_s": round(statistics.median(r[0] for r in measures)),
            "thread_cpu_us_per_event": round(statistics.median(r[1] for r in measures), 2),
            "process_cpu_us_per_event": round(statistics.median(r[2] for r in measures), 2),
            "runs": [[round(r[0]), round(r[1], 2), round(r[2], 2)] for r in measures],
            "events": EVENTS,
            "message_shape": f"{EVENTS_PER_MESSAGE} event(s) per message",
            "machine": machine(),
        }
        for name, measures in runs.items()
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kafka-clients.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [
        "| client | events/s | calling thread CPU per event | process CPU per event |",
        "|---|---:|---:|---:|",
    ]
    rows += [
        f"| {r['client']} | {r['events_per_s']:,} | {r['thread_cpu_us_per_event']} us "
        f"| {r['process_cpu_us_per_event']} us |"
        for r in results
    ]
    replace_table("kafka-clients", rows)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
