"""Ingest and dedupe on the real broker: exact counts for 20,000 events of every shape and flaw."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer

from agents.ingest import Partitioner
from pipeline.loadgen import Expected, LoadPlan, default_now, generate, publish
from pipeline.outputs import OutputReader, Outputs
from pipeline.producer import TallyProducer
from pipeline.settings import Settings
from pipeline.testing import Worker, console_produce, isolated_settings
from schemas.rejections import Reason


async def publish_and_read(
    settings: Settings, plans: list[LoadPlan], foreign_lines: list[bytes], expected: Expected
) -> Outputs:
    async with OutputReader(settings) as reader:
        await reader.start_from(await reader.snapshot())
        now = default_now()
        for plan in plans:
            await publish(settings, generate(plan, now, expected))
        if foreign_lines:
            # Apache Kafka's own console producer: no key, one event per message.
            console_produce(settings, foreign_lines)
        must = len(expected.accepted) + sum(expected.rejected.values())
        return await reader.read_until(must, idle_timeout_s=60, drain_s=3)


def test_exact_counts_for_every_shape_and_every_reason(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, accounts=200)
    plans = [
        LoadPlan(events=9_000, accounts=200, batch_size=1, seed=11),
        LoadPlan(events=10_000, accounts=200, batch_size=100, seed=12),
    ]
    assert (plans[0].max_event_bytes, plans[0].max_message_bytes) == (
        settings.max_event_bytes,
        settings.max_message_bytes,
    )
    # 1,000 clean single events through a foreign client, never repeated (no key: any partition).
    foreign_expected = Expected()
    foreign_plan = LoadPlan(events=1_000, accounts=200, bad_fraction=0, duplicate_fraction=0, seed=13)
    foreign_lines = [m.value for m in generate(foreign_plan, default_now(), foreign_expected)]

    worker = Worker(settings).start()
    try:
        expected = Expected()
        outputs = asyncio.run(publish_and_read(settings, plans, foreign_lines, expected))
    finally:
        worker.stop()
    expected.merge(foreign_expected)
    forwarded = asyncio.run(forwarded_events(settings))

    assert expected.events == 20_000
    assert set(expected.rejected) == {r.value for r in Reason}, "the load covers every reason code"
    assert 0.04 * 20_000 < sum(expected.rejected.values()) < 0.06 * 20_000
    assert 0.04 * 19_000 < expected.duplicates < 0.06 * 19_000

    assert outputs.repeated == {}, "an accepted event came out twice"
    assert set(outputs.identities) == expected.accepted, "accepted events lost or invented"
    assert outputs.accepted == len(expected.accepted)
    assert outputs.rejected == expected.rejected
    assert outputs.misrouted == 0, "accepted events must sit on murmur2(account)'s partition"
    assert expected.events - outputs.total == expected.duplicates
    # Events sent under another key or none were forwarded, normalized, to their account's
    # partition of usage.raw, once each, and accepted there.
    partition_of = Partitioner(settings.partitions)
    # Whatever partition the foreign producer's 1,000 unkeyed events land on, ~5/6 of them
    # (833 +- 12) belong to an account of another one; the load's wrongly keyed ones come on top.
    assert len(forwarded) >= 500, "unkeyed and wrongly keyed events must be forwarded"
    assert all(partition_of(subject) == to != came_from for _, subject, came_from, to in forwarded)
    identities = [identity for identity, _, _, _ in forwarded]
    assert len(set(identities)) == len(identities)
    assert set(identities) <= expected.accepted


async def forwarded_events(settings: Settings) -> list[tuple[tuple[str, str], str, int, int]]:
    """Every event the meter forwarded within usage.raw: ((source, id), subject, from, to)."""
    consumer = AIOKafkaConsumer(
        settings.topic_raw,
        bootstrap_servers=settings.kafka_bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        found: list[tuple[tuple[str, str], str, int, int]] = []
        idle = 0
        while idle < 5:
            batches = await consumer.getmany(timeout_ms=500)
            idle = 0 if batches else idle + 1
            for tp, records in batches.items():
                for record in records:
                    headers = dict(record.headers)
                    if "tally.forwarded-from" not in headers:
                        continue
                    came_from = int(headers["tally.forwarded-from"].rsplit(b"/", 1)[1])
                    found.extend(
                        ((e["source"], e["id"]), e["subject"], came_from, tp.partition)
                        for e in msgspec.json.decode(record.value or b"")
                    )
        return found
    finally:
        await consumer.stop()


def test_dead_letters_keep_the_original_bytes_and_say_why(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    worker = Worker(settings).start()
    bad = [b'{"specversion": "1.0", "id": ', b"\xff\xfe\x00", b'{"specversion":"1.0","type":"gpu.usage.v9"}']

    async def run() -> list[tuple[bytes, dict[str, bytes]]]:
        async with OutputReader(settings) as reader:
            start = await reader.snapshot()
        # Raw bytes, no key (the Java console producer would re-encode invalid UTF-8 as U+FFFD).
        async with TallyProducer(settings) as producer:
            await producer.send_raw([(None, value) for value in bad])
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            parts = [tp for tp in start if tp.topic == settings.topic_rejected]
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, start[tp])
            found: list[tuple[bytes, dict[str, bytes]]] = []
            for _ in range(300):
                batches = await consumer.getmany(timeout_ms=200)
                found += [(r.value, dict(r.headers)) for rs in batches.values() for r in rs]
                if len(found) >= len(bad):
                    break
            return found
        finally:
            await consumer.stop()

    try:
        found = asyncio.run(run())
    finally:
        worker.stop()
    by_value = {value: headers for value, headers in found}
    assert set(by_value) == set(bad)
    assert by_value[bad[0]]["tally.reason"] == b"malformed_json"
    assert by_value[bad[1]]["tally.reason"] == b"malformed_json"
    assert by_value[bad[2]]["tally.reason"] == b"unknown_type"
    for headers in by_value.values():
        assert headers["tally.stage"] == b"ingest"
        assert headers["tally.origin"].startswith(settings.topic_raw.encode() + b"/")
        assert headers["tally.detail"]


def test_python_partitioner_agrees_with_the_java_producer(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    keys = [f"acct-{i:05d}" for i in range(60)]
    lines = [f"{k}|x".encode() for k in keys]
    console_produce(settings, lines, "--property", "parse.key=true", "--property", "key.separator=|")

    async def read() -> dict[str, int]:
        consumer = AIOKafkaConsumer(
            settings.topic_raw,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            seen: dict[str, int] = {}
            for _ in range(100):
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    seen.update({r.key.decode(): tp.partition for r in records})
                if len(seen) == len(keys):
                    break
            return seen
        finally:
            await consumer.stop()

    seen = asyncio.run(read())
    partitioner = Partitioner(settings.partitions)
    assert seen == {k: partitioner(k) for k in keys}
    assert len(set(seen.values())) > 1
    assert msgspec.json.encode(sorted(seen)) == msgspec.json.encode(sorted(keys))
