"""``tally demo``: the walking skeleton end to end on the local stack.

Starts a worker process, publishes synthetic usage (half as single-event messages, half as
100-event batches, with duplicates and every kind of bad input), reads ``usage.accepted`` and
``usage.rejected`` back with a read-committed consumer, and prints what came out beside what had to.
"""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.table import Table

from pipeline.loadgen import Expected, LoadPlan, account_ids, default_now, generate, publish
from pipeline.outputs import OutputReader
from pipeline.settings import Settings
from pipeline.testing import Worker
from pipeline.topics import create_topics


async def run_demo(settings: Settings, *, events: int, accounts: int, console: Console) -> int:
    accounts_file = settings.data_dir / "demo" / "accounts.txt"
    accounts_file.parent.mkdir(parents=True, exist_ok=True)
    accounts_file.write_text("\n".join(account_ids(accounts)) + "\n", encoding="utf-8")
    settings = settings.model_copy(update={"accounts_file": accounts_file})
    for name, status in await create_topics(settings):
        console.print(f"topic {name}: {status}")

    worker = Worker(settings, "demo-worker").start()
    assert worker.process is not None
    # Ready when both stages (ingest, dedupe) hold every partition.
    await asyncio.to_thread(worker.wait_for_log, "took partition", 120, 2 * settings.partitions)
    console.print(f"worker started and ready (pid {worker.process.pid}), log {worker.log_path}")
    try:
        async with OutputReader(settings) as reader:
            await reader.start_from(await reader.snapshot())
            expected = Expected()
            now = default_now()
            started = time.monotonic()
            for shape, batch_size in (("single-event messages", 1), ("100-event batches", 100)):
                plan = LoadPlan(
                    events=events // 2,
                    accounts=accounts,
                    batch_size=batch_size,
                    seed=batch_size,
                    max_event_bytes=settings.max_event_bytes,
                    max_message_bytes=settings.max_message_bytes,
                )
                sent, seconds = await publish(settings, generate(plan, now, expected))
                console.print(f"published {sent:,} events as {shape} in {seconds:.1f} s")
            must_total = len(expected.accepted) + sum(expected.rejected.values())
            outputs = await reader.read_until(must_total, idle_timeout_s=60)
    finally:
        worker.stop()

    table = Table(title="Tally demo: what came out of the pipeline")
    table.add_column("outcome")
    table.add_column("expected", justify="right")
    table.add_column("got", justify="right")
    table.add_row("accepted", f"{len(expected.accepted):,}", f"{outputs.accepted:,}")
    table.add_row("duplicates dropped", f"{expected.duplicates:,}", f"{expected.events - outputs.total:,}")
    for reason in sorted(set(expected.rejected) | set(outputs.rejected)):
        table.add_row(f"rejected: {reason}", str(expected.rejected[reason]), str(outputs.rejected[reason]))
    console.print(table)
    if outputs.first_seen is not None and outputs.last_seen is not None:
        end_to_end = outputs.last_seen - started
        draining = max(outputs.last_seen - outputs.first_seen, 1e-3)
        console.print(
            f"throughput: {expected.events:,} events in {end_to_end:.1f} s from the first publish to the "
            f"last output ({expected.events / end_to_end:,.0f} events/s, publishing included); "
            f"{outputs.total:,} outputs in {draining:.1f} s from the first output to the last "
            f"({outputs.total / draining:,.0f} outputs/s)"
        )
    else:
        console.print("[red]no output at all: see the worker log[/red]")
    ok = (
        set(outputs.identities) == expected.accepted
        and not outputs.repeated
        and outputs.rejected == expected.rejected
    )
    console.print(
        "[green]every event accounted for, exactly once[/green]"
        if ok
        else "[red]outputs differ from what was expected[/red]"
    )
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(run_demo(Settings(), events=10_000, accounts=50, console=Console()))
