"""The dedupe store against its changelog on the real broker: restore, and distrust when ahead."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import AIOKafkaProducer

from agents.dedupe import encode_marks
from agents.meter import MeterStage, mark_ttl, meter_changelog_topic
from pipeline.plans import PlanDirectory
from pipeline.testing import isolated_settings
from schemas.events import fingerprint, identity_key
from sinks.statestore import PartitionStore


def test_store_catches_up_from_the_changelog_and_is_rebuilt_when_ahead_of_it(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    topic = meter_changelog_topic(settings)
    marks = {identity_key("src", f"e{i}"): fingerprint(f"payload {i}".encode()) for i in range(3)}

    async def write_changelog() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for record in encode_marks(marks):
                await producer.send_and_wait(topic, record, partition=0)
        finally:
            await producer.stop()

    async def open_partition() -> tuple[int, bytes | None]:
        task = await MeterStage(settings, PlanDirectory(settings)).open_task(0)
        try:
            return task.store.next_changelog_offset, task.store.get(identity_key("src", "e1"))
        finally:
            task.close()

    asyncio.run(write_changelog())
    offset, value = asyncio.run(open_partition())
    assert value == marks[identity_key("src", "e1")]
    assert offset >= 1

    # A store that claims offsets the changelog never had (the topic was recreated, say) is wiped
    # and rebuilt, so a stale mark cannot drop a new event as a duplicate.
    stale = PartitionStore(settings.state_dir / "meter" / "p0", ttl=mark_ttl(settings))
    stale.apply([(identity_key("src", "ghost"), b"x" * 16)], next_changelog_offset=1_000_000)
    stale.close()

    async def reopen_p0() -> bytes | None:
        task = await MeterStage(settings, PlanDirectory(settings)).open_task(0)
        try:
            assert task.store.next_changelog_offset < 1_000_000
            return task.store.get(identity_key("src", "ghost"))
        finally:
            task.close()

    assert asyncio.run(reopen_p0()) is None
