"""bench/ingest: events/s from ``usage.raw`` to ``usage.accepted`` through ingest and dedupe.

For each message shape (single-event messages, 100-event batches) the same pre-published data is
read three ways in one run:
- baseline: a bare aiokafka consumer that splits and decodes every event (msgspec), nothing else;
- Tally: one ``tally worker`` process running the stages up to ``usage.accepted`` (ingest, and the
  meter: dedupe and windows), exactly-once, timed from its first output to its last, so start-up
  is not counted. Event times ascend over 5 (single) or 15 (batch) minutes, as a live stream's:
  the meter windows every event, and times spread at random over an hour would make most of them
  late adjustments;
- peer (single-event only): quix-streams' exactly-once 1:1 forward of the same messages.
Results: ``bench/results/ingest-<shape>.json`` and the table in ``bench/README.md``.
Targets (one worker process, this 2-core machine): batch >= 100,000 events/s,
single-event >= 50,000 events/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import kafka_frames
from pipeline.loadgen import Expected, LoadPlan, default_now, generate, publish
from pipeline.outputs import OutputReader
from pipeline.settings import REPO_ROOT, Settings
from pipeline.testing import Worker, isolated_settings
from pipeline.topics import create_topics, delete_topics_with_prefix
from schemas.events import batch_splitter, event_decoder

RESULTS = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "bench" / "README.md"
# shape: (events per message, events, seconds of event time)
SHAPES = {"single": (1, 300_000, 300), "batch": (100, 1_000_000, 900)}
TARGETS = {"single": 50_000, "batch": 100_000}
REPEATS = 3


def machine() -> dict[str, Any]:
    mem_kib = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka": "4.1.1 (deploy/local, KRaft, one broker)",
    }


async def bare_consumer(settings: Settings, events: int) -> float:
    """Events/s of a bare aiokafka consumer that decodes every event of usage.raw."""
    kafka_frames.install()  # the client as the worker runs it (pipeline.app.create_app)
    consumer = AIOKafkaConsumer(
        settings.topic_raw,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        seen = 0
        started = time.perf_counter()
        while seen < events:
            for records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
                for record in records:
                    value = record.value
                    if value[:1] == b"[":
                        for raw in batch_splitter.decode(value):
                            event_decoder.decode(raw)
                            seen += 1
                    else:
                        event_decoder.decode(value)
                        seen += 1
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def timed_outputs(settings: Settings, topic: str | None, total: int) -> float:
    """Events/s on the output, from the first output record to the ``total``-th event."""
    settings = settings.model_copy(update={"topic_accepted": topic}) if topic else settings
    # read_uncommitted: records count when written, not in bursts at each commit (quix-streams
    # commits every 5 s, Tally every poll), so both are timed the same way. No crash happens in a
    # bench, so nothing aborted is counted.
    async with OutputReader(settings, keep_identities=False, isolation_level="read_uncommitted") as reader:
        await reader.start_from({tp: 0 for tp in await reader.snapshot()})
        while reader.outputs.accepted == 0:
            await reader.poll()
        assert reader.outputs.first_seen is not None
        first_count, first_time = reader.outputs.accepted, reader.outputs.first_seen
        outputs = await reader.read_until(total, idle_timeout_s=120, drain_s=0)
        assert outputs.accepted >= total, f"only {outputs.accepted} of {total} events came out"
        assert outputs.last_seen is not None
        return (outputs.accepted - first_count) / (outputs.last_seen - first_time)


async def create_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, settings.partitions, 1)])
    finally:
        await admin.close()


def clean_stream(events: int, accounts: int, batch_size: int, *, seed: int, span_s: int) -> LoadPlan:
    """The benches' data: clean synthetic usage (no bad events, duplicates or mis-keyed messages)
    with event times ascending over ``span_s`` seconds, as a live stream's."""
    return LoadPlan(
        events=events,
        accounts=accounts,
        batch_size=batch_size,
        bad_fraction=0,
        duplicate_fraction=0,
        wrong_key_fraction=0,
        seed=seed,
        ordered_time=True,
        time_span_s=span_s,
    )


def run_shape(shape: str, work: Path) -> dict[str, Any]:
    batch_size, events, span = SHAPES[shape]
    # The stages up to usage.accepted (bench/meter measures the ledger, bench/analytics ClickHouse).
    settings = isolated_settings(work / shape, accounts=1000, accounts_file=None, stages="meter")
    expected = Expected()
    plan = clean_stream(events, 1000, batch_size, seed=7, span_s=span)
    sent, seconds = asyncio.run(publish(settings, generate(plan, default_now(), expected), chunk=5_000))
    print(f"[{shape}] published {sent:,} events in {seconds:.1f} s", flush=True)

    # Each figure is the median of REPEATS runs, alternating baseline and Tally, over the same
    # published data (each Tally run with consumer groups and output topics of its own).
    baselines, tallies = [], []
    for repeat in range(REPEATS):
        baselines.append(asyncio.run(bare_consumer(settings, events)))
        run = settings.model_copy(
            update={
                "app_id": f"{settings.app_id}-r{repeat}",
                "topic_accepted": f"{settings.topic_accepted}.r{repeat}",
                "topic_rejected": f"{settings.topic_rejected}.r{repeat}",
            }
        )
        asyncio.run(create_topics(run))
        worker = Worker(run, f"bench-r{repeat}").start()
        try:
            tallies.append(asyncio.run(timed_outputs(run, None, events)))
        finally:
            worker.stop()
        print(
            f"[{shape}] run {repeat + 1}: bare consumer + decode {baselines[-1]:,.0f} events/s, "
            f"tally ingest + dedupe (exactly-once) {tallies[-1]:,.0f} events/s",
            flush=True,
        )
    baseline, tally = statistics.median(baselines), statistics.median(tallies)
    # The peer below reads usage.raw too: topics go when the shape is done.

    result: dict[str, Any] = {
        "name": f"ingest-{shape}",
        "events_per_s": round(tally),
        "baseline_events_per_s": round(baseline),
        "ratio": round(tally / baseline, 3),
        "message_shape": f"{batch_size} event(s) per message",
        "events": events,
        "runs": {
            "events_per_s": [round(t) for t in tallies],
            "baseline_events_per_s": [round(b) for b in baselines],
        },
        "target_events_per_s": TARGETS[shape],
        "meets_target": tally >= TARGETS[shape],
        "machine": machine(),
    }
    if shape == "single":
        peer_topic = f"{settings.topic_raw}.quix-out"
        asyncio.run(create_topic(settings, peer_topic))
        peer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.quix_forward",
                settings.kafka_bootstrap,
                settings.topic_raw,
                peer_topic,
                f"{settings.app_id}-quix",
            ],
            cwd=REPO_ROOT,
        )
        try:
            quix = asyncio.run(timed_outputs_raw(settings, peer_topic, events))
        finally:
            peer.terminate()
            peer.wait(30)
        print(f"[{shape}] quix-streams exactly-once 1:1 forward: {quix:,.0f} events/s", flush=True)
        result["peer_quixstreams_exactly_once_forward_events_per_s"] = round(quix)
    dropped = asyncio.run(delete_topics_with_prefix(settings, settings.app_id))
    print(f"[{shape}] deleted the run's {len(dropped)} topics", flush=True)
    return result


async def timed_outputs_raw(settings: Settings, topic: str, total: int) -> float:
    """Messages/s on a topic of single events written by a peer, first record to the ``total``-th."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_uncommitted",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen, first_count, first, last = 0, 0, 0.0, 0.0
        deadline = time.monotonic() + 300
        while seen < total and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            n = sum(len(r) for r in batches.values())
            seen += n
            if n and not first:
                first, first_count = time.monotonic(), seen
            if n:
                last = time.monotonic()
        assert seen >= total, f"only {seen} of {total} events came out of the peer"
        return (seen - first_count) / (last - first)
    finally:
        await consumer.stop()


def write_readme(results: list[dict[str, Any]]) -> None:
    rows = [
        "| bench | message shape | events/s | bare consumer events/s | ratio | target "
        "| peer (quix-streams EOS forward) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peer = r.get("peer_quixstreams_exactly_once_forward_events_per_s")
        rows.append(
            f"| {r['name']} | {r['message_shape']} | {r['events_per_s']:,} | {r['baseline_events_per_s']:,} "
            f"| {r['ratio']} | {r['target_events_per_s']:,} {'met' if r['meets_target'] else 'MISSED'} "
            f"| {f'{peer:,}' if peer else '-'} |"
        )
    replace_table("ingest", rows)


def replace_table(marker: str, rows: list[str]) -> None:
    """Put ``rows`` between the ``<!-- marker:begin/end -->`` comments of bench/README.md."""
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    table = f"{begin}\n" + "\n".join(rows) + f"\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + table + text[text.index(end) + len(end) :]
    else:
        text += "\n" + table + "\n"
    README.write_text(text, encoding="utf-8")


def run_benches(
    name: str,
    all_shapes: Iterable[str],
    run_shape: Callable[[str, Path], dict[str, Any]],
    write_readme: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Run the shapes named on the command line (default: all), write each one's JSON, and the
    README table from those and the earlier results of the shapes not run this time."""
    work = Path(os.environ.get("TALLY_BENCH_DIR", REPO_ROOT / ".data" / "bench")) / name
    RESULTS.mkdir(parents=True, exist_ok=True)
    known = list(all_shapes)
    shapes = sys.argv[1:] or known  # e.g. `python -m bench.ingest batch`
    results = [
        json.loads(p.read_text())
        for p in sorted(RESULTS.glob(f"{name}-*.json"))
        if p.stem.removeprefix(f"{name}-") in known and p.stem.removeprefix(f"{name}-") not in shapes
    ]
    for shape in shapes:
        result = run_shape(shape, work)
        (RESULTS / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        results.append(result)
    write_readme(sorted(results, key=lambda r: str(r["name"]), reverse=True))
    print(json.dumps(results, indent=2))


def main() -> None:
    run_benches("ingest", SHAPES, run_shape, write_readme)


if __name__ == "__main__":
    main()
