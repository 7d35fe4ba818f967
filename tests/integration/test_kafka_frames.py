"""Large fetch responses from the real broker, read through LargeFrameReader: every record
arrives exactly as produced, and the large path is the one that read them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline import kafka_frames
from pipeline.kafka_frames import LARGE_FRAME_BYTES, LargeFrameReader
from pipeline.testing import isolated_settings

MESSAGES = 1_200
MESSAGE_BYTES = 6_000  # ~7 MiB in all: fetches of 4 MiB per partition are large frames


def test_large_fetch_responses_arrive_whole_through_the_large_frame_reader(tmp_path: Path) -> None:
    assert kafka_frames.install(), "aiokafka no longer has the hook pipeline/kafka_frames.py uses"
    settings = isolated_settings(tmp_path)
    tp = TopicPartition(settings.topic_raw, 0)
    values = [os.urandom(MESSAGE_BYTES) for _ in range(MESSAGES)]  # incompressible, so frames stay large

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for value in values:
                await producer.send(tp.topic, value, partition=tp.partition)
            await producer.flush()
        finally:
            await producer.stop()

    async def consume() -> tuple[list[bytes], set[type]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            got: list[bytes] = []
            while len(got) < MESSAGES:
                batch = await consumer.getmany(tp, timeout_ms=5_000)
                assert batch, "no records within 5 s"
                got.extend(record.value for record in batch[tp] if record.value is not None)
            readers = {type(conn._reader) for conn in consumer._client._conns.values()}
            return got, readers
        finally:
            await consumer.stop()

    asyncio.run(produce())
    before = LargeFrameReader.large_frames_read
    got, readers = asyncio.run(consume())
    assert got == values
    assert readers == {LargeFrameReader}
    # ~7 MiB in fetches of at most 4 MiB: at least one response was a frame of 1 MiB or more.
    assert MESSAGES * MESSAGE_BYTES > 2 * LARGE_FRAME_BYTES
    assert LargeFrameReader.large_frames_read > before
