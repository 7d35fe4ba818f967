"""The ledger stage in a worker: charges from Kafka land in Postgres once, across a SIGKILL."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from sqlalchemy import create_engine, text

from pipeline.outputs import OutputReader
from pipeline.testing import Worker, isolated_settings
from schemas.charges import charges_encoder
from sinks.postgres import sqlalchemy_url
from tests.integration.test_ledger import charges


def test_charges_reach_the_ledger_exactly_once_across_a_kill(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    every = charges(6_000, seed=3)
    # Each charge twice (a replaying rater), in messages of 200, plus one message that is not charges.
    messages = [charges_encoder.encode(every[i : i + 200]) for i in range(0, len(every), 200)] * 2
    messages.insert(7, b"not a charges batch")

    killed = threading.Event()

    async def publish() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for index, message in enumerate(messages):
                if index == len(messages) // 3:
                    # The rest of the stream waits for the kill, so it lands mid-stream however
                    # fast or slow the worker is (a 3 s stream once ended before the kill).
                    await producer.flush()
                    await asyncio.to_thread(killed.wait, 120)
                await producer.send(settings.topic_charges, message, key=b"acct")
                await asyncio.sleep(0.05)
            await producer.flush()
        finally:
            await producer.stop()

    engine = create_engine(sqlalchemy_url(settings))

    def stored() -> tuple[int, int, int, int]:
        with engine.connect() as db:
            count, amount = db.execute(
                text("SELECT count(*), coalesce(sum(amount_base_units), 0) FROM charges")
            ).one()
            debits, credits = db.execute(
                text(
                    "SELECT coalesce(sum(amount_base_units) FILTER (WHERE side = 'debit'), 0),"
                    " coalesce(sum(amount_base_units) FILTER (WHERE side = 'credit'), 0) FROM ledger_entries"
                )
            ).one()
            return int(count), int(amount), int(debits), int(credits)

    async def dead_letters() -> dict[str, int]:
        async with OutputReader(settings) as reader:
            await reader.start_from({tp: 0 for tp in await reader.snapshot()})
            outputs = await reader.read_until(1, idle_timeout_s=30, drain_s=1)
            return dict(outputs.rejected)

    worker = Worker(settings).start()
    publisher = threading.Thread(target=lambda: asyncio.run(publish()))
    try:
        worker.wait_for_log("took partition", 60, count=2 * settings.partitions)  # meter, ledger
        publisher.start()
        deadline = time.monotonic() + 60
        while stored()[0] < 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.kill()  # mid-stream: some polls written to Postgres, their offsets maybe not committed
        assert publisher.is_alive(), "the stream ended before the kill"
        killed.set()
        worker.start()
        publisher.join(120)
        deadline = time.monotonic() + 90
        while stored()[0] < len(every) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # a repeat would show now
        count, amount, debits, credits = stored()
        rejected = asyncio.run(dead_letters())
    finally:
        worker.stop()
        engine.dispose()
    assert count == len(every)
    assert amount == sum(c.amount_base_units for c in every)
    assert debits == credits == amount
    assert rejected == {"schema_violation": 1}
