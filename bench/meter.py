"""bench/meter: events/s from ``usage.raw`` to charge rows in Postgres, and window close -> row.

One ``tally worker`` process runs the whole path (ingest -> meter: dedupe, windows, rating ->
ledger: Postgres charges, double-entry entries, balances), exactly-once, over pre-published data:
100 accounts (three in four on API tiers), event times ascending as a live stream's are (~13 and
~16 events per charge row, single and batch), so windows close all along the run as the
watermark passes them. For each shape (single-event messages, 100-event batches):
- baseline: a bare aiokafka consumer that splits and decodes the same messages (``bench.ingest``);
- Tally: from the moment the meter's worker has opened every ``usage.raw`` partition (its log's
  clock) to the moment the last charge row of the data's windows is committed in Postgres (the
  Postgres clock; same machine), so worker start-up is not counted and the first fetch is.
  One event per account at the end, 370 s after the data, moves every partition's watermark past
  the data's last window plus the 5-minute grace; its own windows are not counted;
- latency: per charge row, Postgres' ``recorded_at`` (the ledger transaction) minus ``rated_at``
  (when the meter closed the window): p50 and p99 over all counted rows.
``batch-split`` runs the batch data on two worker processes (ingest | meter + ledger), for
comparison: the targets are for one.
Results: ``bench/results/meter-<shape>.json`` and the table in ``bench/README.md``.
Targets (one worker process, this 2-core machine): batch >= 80,000 events/s, single
>= 40,000 events/s, window close -> charge row p99 <= 2 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from sqlalchemy import create_engine

from agents.plans import AccountPlan, FixedPlans
from agents.window import WindowConfig, Windows
from agents.window_state import Stored
from bench.ingest import bare_consumer, clean_stream, machine, replace_table, run_benches
from pipeline.loadgen import Expected, Message, account_ids, default_now, generate, publish
from pipeline.oracle import USER_TYPES, store_plans, tier_plans
from pipeline.settings import REPO_ROOT, Settings
from pipeline.testing import Worker, isolated_database, isolated_settings
from pipeline.topics import create_topics, delete_topics_with_prefix
from schemas.events import batch_splitter, event_decoder
from schemas.pricebook import load_price_book
from sinks.postgres import sqlalchemy_url

# shape: (events per message, events, seconds of event time). ~13 and ~16 events per charge row
# (the single shape's fewer events over a third of the time), so they differ little but in how
# events travel.
SHAPES = {"single": (1, 300_000, 300), "batch": (100, 1_000_000, 900)}
TARGETS = {"single": 40_000, "batch": 80_000}
# Extra runs (no target: the targets are for one process): the batch data with the meter (ingest
# included) in one worker process and the ledger in another, as a deployment may split stages.
SPLIT_SUFFIX = "-split"
SPLIT_STAGES = ("meter", "ledger")
ALL_SHAPES = [*SHAPES, f"batch{SPLIT_SUFFIX}"]
P99_TARGET_S = 2.0
REPEATS = 3
# 100 accounts: with the loadgen's ~40 meter/dimension combinations per account and 60 s windows,
# a minute of 3,300 events makes ~4,000 charge rows at most. Charge rows cost ~25 us in the
# meter and a COPYed row in Postgres; events cost ~20 us through the whole path.
ACCOUNTS = 100
# The closing events' distance from the data's end: past its last window's end (+60 s) plus the
# grace (+300 s).
PUSH_AFTER = timedelta(seconds=370)


def closing_events(now: datetime) -> list[Message]:
    """One small storage event per account at ``now + PUSH_AFTER``: watermarks past the data."""
    at = (now + PUSH_AFTER).isoformat()
    messages = []
    for account in account_ids(ACCOUNTS):
        event = {
            "specversion": "1.0",
            "id": f"close-{account}",
            "source": "bench-meter",
            "type": "storage.usage.v1",
            "time": at,
            "subject": account,
            "data": {"storage_kind": "bucket", "resource_id": "close", "gb": "1", "duration_seconds": 60},
        }
        messages.append(Message(account.encode(), msgspec.json.encode(event), 1))
    return messages


def expected_rows(messages: list[Message], plans: dict[str, str | None]) -> int:
    """Charge rows the data's windows make: every window, fee and compute session the pipeline's
    own window core rates when all of them close (the data ascends in time: no adjustments)."""
    book = load_price_book(REPO_ROOT / "schemas" / "pricebooks" / "default.yaml")
    directory = FixedPlans(AccountPlan(book))
    for account, tier in plans.items():
        directory.set(account, AccountPlan(book, tier, USER_TYPES[tier]) if tier else AccountPlan(book))
    nothing_stored: dict[bytes, bytes] = {}
    windows = Windows(WindowConfig(), directory, nothing_stored.get, Stored.nothing())
    for message in messages:
        for raw in batch_splitter.decode(message.value) if message.value[:1] == b"[" else [message.value]:
            windows.add(event_decoder.decode(raw))
    far = datetime.now(UTC) + timedelta(days=1)
    return len(windows.close(far, wall_clock=int(far.timestamp())).charges)


METER_READY_LINE = "meter: took partition"


def meter_ready_wall_time(meter: Worker, partitions: int) -> float:
    """When the meter's worker had opened every input partition (the last "took partition" line
    of its current start, epoch seconds): it fetches and processes from then on. Timing from the
    first accepted output instead skipped the first poll's work: measured 0.49 s after this
    moment, ~37,000 events at 75,000 events/s, 3-4% in Tally's favour."""
    meter.wait_for_log(METER_READY_LINE, count=partitions)
    return max(meter.times_logged(METER_READY_LINE))


def wait_for_rows(
    run: Settings, rows: int, cutoff: datetime, timeout_s: float = 600
) -> tuple[float, float, float]:
    """Wait for ``rows`` charge rows of windows before ``cutoff``; return (last row's commit as
    epoch seconds, p50 and p99 of recorded_at - rated_at in seconds)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(run.postgres_url, autocommit=True) as connection:
        while True:
            (count,) = connection.execute(
                "SELECT count(*) FROM charges WHERE window_start < %s", (cutoff,)
            ).fetchone() or (0,)
            if count >= rows:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {count} of {rows} charge rows after {timeout_s} s")
            time.sleep(0.2)
        row = connection.execute(
            "SELECT extract(epoch FROM max(recorded_at)),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - rated_at)),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - rated_at))"
            " FROM charges WHERE window_start < %s",
            (cutoff,),
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1]), float(row[2])


def start_workers(run: Settings, repeat: int, split: bool) -> list[Worker]:
    if not split:
        return [Worker(run, f"bench-r{repeat}").start()]
    return [
        Worker(run.model_copy(update={"stages": stages}), f"bench-r{repeat}-{stages.split(',')[0]}").start()
        for stages in SPLIT_STAGES
    ]


def run_shape(shape: str, work: Path) -> dict[str, Any]:
    split = shape.endswith(SPLIT_SUFFIX)
    data_shape = shape.removesuffix(SPLIT_SUFFIX)
    batch_size, events, span = SHAPES[data_shape]
    # The money path only: usage.raw -> Postgres (bench/analytics measures the analytics agent).
    settings = isolated_settings(
        work / shape,
        accounts=ACCOUNTS,
        accounts_file=None,
        window_idle_close="PT600S",
        stages="meter,ledger",
    )
    plans = tier_plans(account_ids(ACCOUNTS))
    # The data ends 3 minutes ago, so the closing events (+370 s) stay within ingest's 5-minute
    # tolerance for future times.
    now = default_now() - timedelta(minutes=3)
    plan = clean_stream(events, ACCOUNTS, batch_size, seed=11, span_s=span)
    messages = list(generate(plan, now, Expected()))
    rows = expected_rows(messages, plans)
    cutoff = now + timedelta(minutes=1)  # every data window starts before this; no closing one does
    sent, seconds = asyncio.run(publish(settings, [*messages, *closing_events(now)], chunk=5_000))
    print(
        f"[{shape}] published {sent:,} events in {seconds:.1f} s; {rows:,} charge rows expected", flush=True
    )

    baselines, tallies, p50s, p99s = [], [], [], []
    for repeat in range(REPEATS):
        baselines.append(asyncio.run(bare_consumer(settings, events)))
        run = isolated_database(
            settings.model_copy(
                update={
                    "app_id": f"{settings.app_id}-r{repeat}",
                    "topic_accepted": f"{settings.topic_accepted}.r{repeat}",
                    "topic_rejected": f"{settings.topic_rejected}.r{repeat}",
                    "topic_charges": f"{settings.topic_charges}.r{repeat}",
                }
            )
        )
        asyncio.run(create_topics(run))
        engine = create_engine(sqlalchemy_url(run))
        store_plans(engine, plans)
        engine.dispose()
        workers = start_workers(run, repeat, split)
        try:
            first = meter_ready_wall_time(workers[0], run.partitions)
            last, p50, p99 = wait_for_rows(run, rows, cutoff)
        finally:
            for worker in workers:
                worker.stop()
        tallies.append(events / (last - first))
        p50s.append(p50)
        p99s.append(p99)
        print(
            f"[{shape}] run {repeat + 1}: bare consumer + decode {baselines[-1]:,.0f} events/s, tally raw -> "
            f"charge rows {tallies[-1]:,.0f} events/s, window close -> row p50 {p50:.3f} s p99 {p99:.3f} s",
            flush=True,
        )
    dropped = asyncio.run(delete_topics_with_prefix(settings, settings.app_id))
    print(f"[{shape}] deleted the run's {len(dropped)} topics", flush=True)
    baseline, tally = statistics.median(baselines), statistics.median(tallies)
    p99 = statistics.median(p99s)
    return {
        "name": f"meter-{shape}",
        "events_per_s": round(tally),
        "baseline_events_per_s": round(baseline),
        "ratio": round(tally / baseline, 3),
        "message_shape": f"{batch_size} event(s) per message",
        "events": events,
        "charge_rows": rows,
        "events_per_charge_row": round(events / rows, 1),
        "window_close_to_row_p50_s": round(statistics.median(p50s), 3),
        "window_close_to_row_p99_s": round(p99, 3),
        "runs": {
            "events_per_s": [round(t) for t in tallies],
            "baseline_events_per_s": [round(b) for b in baselines],
            "p50_s": [round(p, 3) for p in p50s],
            "p99_s": [round(p, 3) for p in p99s],
        },
        "worker_processes": len(SPLIT_STAGES) if split else 1,
        "target_events_per_s": None if split else TARGETS[data_shape],
        "target_p99_s": P99_TARGET_S,
        "meets_target": None if split else tally >= TARGETS[data_shape] and p99 <= P99_TARGET_S,
        "machine": machine(),
    }


def write_readme(results: list[dict[str, Any]]) -> None:
    rows = [
        "| bench | message shape | events/s | bare consumer events/s | ratio | close -> row p50 / p99 "
        "| target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("target_events_per_s") is None:
            target = f"none: {r['worker_processes']} worker processes (the targets are for one)"
        else:
            verdict = "met" if r["meets_target"] else "MISSED"
            target = f"{r['target_events_per_s']:,}/s, p99 <= {r['target_p99_s']} s: {verdict}"
        rows.append(
            f"| {r['name']} | {r['message_shape']} | {r['events_per_s']:,} | {r['baseline_events_per_s']:,} "
            f"| {r['ratio']} | {r['window_close_to_row_p50_s']} s / {r['window_close_to_row_p99_s']} s "
            f"| {target} |"
        )
    replace_table("meter", rows)


def main() -> None:
    run_benches("meter", ALL_SHAPES, run_shape, write_readme)


if __name__ == "__main__":
    main()
