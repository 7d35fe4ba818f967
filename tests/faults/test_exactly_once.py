"""Exactly-once under faults: SIGKILLed workers and rebalances lose and repeat nothing.

Each run publishes a throttled stream (so the faults land mid-stream), applies its faults at
fixed points of output progress, then reads ``usage.accepted`` and ``usage.rejected`` with a
read-committed consumer and compares them with what the load generator says must come out.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline.loadgen import Expected, LoadPlan, default_now, generate
from pipeline.outputs import OutputReader, Outputs
from pipeline.settings import Settings
from pipeline.testing import Fault, Worker, isolated_settings, publish_with_faults

# Events per run, and the publish rate that spreads them over ~30 s so faults land mid-stream.
EVENTS = 60_000
RATE = 2_000.0


async def run_with_faults(settings: Settings, faults: list[tuple[float, Fault]]) -> tuple[Expected, Outputs]:
    """Publish EVENTS (half single-event messages, half 100-event batches) and fire each fault once
    the outputs reach its fraction of the expected total; return what had to and what did come out."""
    expected = Expected()
    plans = [
        LoadPlan(events=EVENTS // 2, accounts=300, batch_size=1, seed=21),
        LoadPlan(events=EVENTS // 2, accounts=300, batch_size=100, seed=22),
    ]
    # The expected total is known before publishing: generate once to count, publish the same.
    now = default_now()
    messages = [m for plan in plans for m in generate(plan, now, expected)]
    must = len(expected.accepted) + sum(expected.rejected.values())
    async with OutputReader(settings) as reader:
        await reader.start_from(await reader.snapshot())

        def no_repeat_yet() -> None:
            assert reader.outputs.repeated == {}, "a repeat is visible already"

        await publish_with_faults(
            settings, messages, reader, must, faults, rate=RATE, after_each=no_repeat_yet
        )
        outputs = await reader.read_until(must, idle_timeout_s=90, drain_s=5)
    return expected, outputs


def assert_exactly_once(expected: Expected, outputs: Outputs) -> None:
    assert outputs.repeated == {}, f"{len(outputs.repeated)} accepted events came out more than once"
    lost = expected.accepted - set(outputs.identities)
    invented = set(outputs.identities) - expected.accepted
    assert not lost, f"{len(lost)} accepted events lost"
    assert not invented, f"{len(invented)} events accepted that should not have been"
    assert outputs.rejected == expected.rejected
    assert outputs.misrouted == 0


def test_three_sigkills_mid_stream_lose_and_repeat_nothing(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, accounts=300)
    worker = Worker(settings).start()

    async def kill_and_restart() -> None:
        worker.kill()
        worker.start()

    try:
        expected, outputs = asyncio.run(
            run_with_faults(
                settings, [(0.15, kill_and_restart), (0.40, kill_and_restart), (0.65, kill_and_restart)]
            )
        )
    finally:
        worker.stop()
    assert worker.starts == 4
    assert expected.duplicates > 0
    assert_exactly_once(expected, outputs)
    # The restarted worker reopened its dedupe stores and replayed the changelog tail.
    assert worker.log().count("=== start") == 4


def test_a_second_worker_joining_and_leaving_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, accounts=300)
    first = Worker(settings, "worker-1").start()
    second = Worker(settings, "worker-2")

    async def join() -> None:
        second.start()
        await asyncio.to_thread(second.wait_for_log, "took partition", 60)

    async def leave() -> None:
        await asyncio.to_thread(second.stop)

    try:
        expected, outputs = asyncio.run(run_with_faults(settings, [(0.20, join), (0.55, leave)]))
    finally:
        first.stop()
        second.stop()
    assert_exactly_once(expected, outputs)
    # Both rebalances happened: the second worker took partitions, and the first released and took again.
    assert "took partition" in second.log()
    assert "released partition" in first.log()
