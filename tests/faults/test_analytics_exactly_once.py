"""ClickHouse agrees with Postgres after duplicates, a worker SIGKILL and a ClickHouse outage.

ClickHouse here is a server process (``tally clickhouse serve``: the embedded engine behind
ClickHouse's HTTP interface) that the worker reaches over HTTP, the way it reaches a ClickHouse
server, so the test can take it away: it is SIGKILLed mid-run and restarted 35 s later. For those
35 s every insert fails; the analytics agent pauses, keeps its batches and offsets, and resumes by
itself. At the end, ``reconcile`` (ClickHouse's raw charges and daily rollup against Postgres, per
account and day) lists no difference, and every accepted event is in ClickHouse once, in the raw
table and in every rollup.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import create_engine

from pipeline.loadgen import Expected, LoadPlan, account_ids, default_now, generate
from pipeline.oracle import accepted_events, oracle, store_plans, tier_plans
from pipeline.outputs import OutputReader
from pipeline.reconcile import reconcile
from pipeline.testing import ClickHouseServer, Worker, isolated_settings, publish_with_faults
from sinks.clickhouse import connect
from sinks.postgres import account_totals, sqlalchemy_url

EVENTS = 40_000
RATE = 2_000.0  # events/s: 20 s of input, so the faults land mid-stream
OUTAGE_S = 35.0


def test_clickhouse_matches_postgres_after_duplicates_a_sigkill_and_a_35_s_clickhouse_outage(
    tmp_path: Path,
) -> None:
    server = ClickHouseServer(tmp_path / "clickhouse-server", tmp_path / "logs" / "clickhouse.log").start()
    settings = isolated_settings(
        tmp_path,
        accounts=100,
        window_idle_close="PT3S",
        window_grace="PT20S",
        clickhouse_url=server.url,
        analytics_batch_interval="PT0.5S",
        analytics_retry_max="PT2S",
    )
    plans = tier_plans(account_ids(100))
    engine = create_engine(sqlalchemy_url(settings))
    store_plans(engine, plans)
    expected = Expected()
    span = int(EVENTS / RATE)
    plan = LoadPlan(
        EVENTS, 100, batch_size=50, seed=7, duplicate_fraction=0.1, ordered_time=True, time_span_s=span
    )
    messages = list(generate(plan, default_now(), expected))
    must = len(expected.accepted) + sum(expected.rejected.values())
    want = oracle(settings, accepted_events(messages, expected), plans)
    worker = Worker(settings, "worker-1").start()
    outage: dict[str, float] = {}

    async def kill_worker() -> None:
        worker.kill()
        worker.start()

    async def restore_clickhouse() -> None:
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(server.start)
        outage["ended"] = time.monotonic()

    tasks: list[asyncio.Task[None]] = []

    async def take_clickhouse_away() -> None:
        # Mid-stream for the agent too: the restarted worker has written to ClickHouse already.
        client = connect(server.url)
        before = client.query("SELECT count() FROM usage_events").result_rows[0][0]
        deadline = time.monotonic() + 60
        while client.query("SELECT count() FROM usage_events").result_rows[0][0] == before:
            assert time.monotonic() < deadline, "the restarted worker never wrote to ClickHouse"
            await asyncio.sleep(0.2)
        client.close()
        server.kill()
        outage["started"] = time.monotonic()
        tasks.append(asyncio.create_task(restore_clickhouse()))

    async def drive() -> None:
        async with OutputReader(settings, keep_identities=False) as reader:
            await reader.start_from(await reader.snapshot())
            faults = [(0.25, kill_worker), (0.5, take_clickhouse_away)]
            await publish_with_faults(settings, messages, reader, must, faults, rate=RATE)
            await reader.read_until(must, idle_timeout_s=120, drain_s=2)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(drive())
        client = connect(server.url)
        deadline = time.monotonic() + 180
        while True:
            charged = account_totals(engine)
            differences = reconcile(engine, client)
            stored = client.query("SELECT count() FROM usage_events").result_rows[0][0]
            settled = charged == want and not differences and stored == len(expected.accepted)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(2)
        rollups = [
            client.query(f"SELECT sum(events) FROM {table}").result_rows[0][0]  # noqa: S608  # constants
            for table in ("usage_1m", "usage_1h", "usage_1d", "usage_accounts_1d")
        ]
        client.close()
    finally:
        worker.stop()
        server.stop()
        engine.dispose()
    assert worker.starts == 2
    assert outage["ended"] - outage["started"] >= 30
    log = worker.log()
    assert "ClickHouse insert failed" in log and "ClickHouse is back; input resumed" in log
    assert charged == want  # the money path was not held up by the outage
    assert differences == [], f"{len(differences)} differences, e.g. {differences[:3]}"
    assert [stored] * 4 == [len(expected.accepted)] * 4 == rollups
    assert expected.duplicates > 0
