"""Whatever an operator does to plans and price books while windows are open, a running worker
keeps running and loses nothing (real Kafka and Postgres): usage that can no longer be priced is
dead-lettered `unpriced` with its reason, and once the books are whole again, replaying the dead
letters charges exactly what the rules say.

Changes made with windows open: a plan switched to one without an API tier; an API tier, a GPU
model and a product removed from a book; a whole book removed; a version's start moved (its
label gone).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer
from sqlalchemy import Engine, create_engine, text

from pipeline.outputs import OutputReader
from pipeline.producer import TallyProducer
from pipeline.settings import REPO_ROOT, Settings
from pipeline.testing import Worker, isolated_settings
from sinks.postgres import change_plan, sqlalchemy_url, upsert_accounts, upsert_plans

USDC = 1_000_000

OPS = """name: ops
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu: {base_rate_per_hour: {rtx_4090: "0.50", a100: "2.00"}, power_rate_per_watt_hour: "0"}
    api_tiers:
      startup: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}
      doomed: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}
    products:
      gpt-4: {pricing: {model: per_unit, unit_price: "0.002"}}
      other: {pricing: {model: per_unit, unit_price: "0.002"}}
  - effective_from: "2026-02-01T00:00:00Z"
    gpu: {base_rate_per_hour: {rtx_4090: "0.50", a100: "2.00"}, power_rate_per_watt_hour: "0"}
    api_tiers:
      startup: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}
      doomed: {monthly_fee: "50", included_requests: 10000, overage_per_request: "0.01"}
    products:
      gpt-4: {pricing: {model: per_unit, unit_price: "0.002"}}
      drop: {pricing: {model: per_unit, unit_price: "0.01"}}
"""
# The operator's edit, all at once: the tier "doomed", the a100 and gpt-4 removed, and the second
# version moved a day later (its label, 2026-02-01T00:00:00Z, gone).
EDITED = (
    OPS.replace("      doomed: {monthly_fee", "      #doomed: {monthly_fee")
    .replace(', a100: "2.00"', "")
    .replace("      gpt-4:", "      #gpt-4:")
    .replace("2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z")
)


def event(kind: str, at: datetime, account: str, serial: int, **data: object) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"{account}-{serial}",
        "source": "ops-test",
        "type": kind,
        "time": at.isoformat(),
        "subject": account,
        "data": data,
    }


def heartbeat(at: datetime, account: str, serial: int, model: str) -> dict[str, object]:
    total = "80" if model == "a100" else "24"
    return event(
        "gpu.usage.v1",
        at,
        account,
        serial,
        session_id="s",
        provider_id="p",
        node_id="n",
        gpu_model=model,
        vram_total_gb=total,
        vram_allocated_gb=total,
        power_watts="0",
        utilization="0.5",
        interval_seconds=60,
    )


def api(at: datetime, account: str, serial: int, requests: int = 0, **data: object) -> dict[str, object]:
    return event("api.request.v1", at, account, serial, endpoint="/v1", request_count=requests, **data)


async def publish(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    async with TallyProducer(settings) as producer:
        await producer.send_raw(values)


async def accepted(settings: Settings, count: int) -> None:
    async with OutputReader(settings) as reader:
        await reader.start_from({tp: 0 for tp in await reader.snapshot()})
        outputs = await reader.read_until(count, idle_timeout_s=60, drain_s=0)
        assert outputs.accepted == count, outputs


async def dead_letters(settings: Settings) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        settings.topic_rejected,
        bootstrap_servers=settings.kafka_bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        out = []
        batch = await consumer.getmany(timeout_ms=2_000)
        while batch:
            for records in batch.values():
                out += [(r.value or b"", {k: v for k, v in r.headers}) for r in records]
            batch = await consumer.getmany(timeout_ms=1_000)
        return out
    finally:
        await consumer.stop()


def changes_seen(worker: Worker) -> int:
    """How many times the worker's plan directory has logged that its plans changed."""
    return worker.current_log().count("plans changed")


def reloaded(worker: Worker, seen: int) -> None:
    """Wait until the worker's plan directory has taken up the changes made since ``seen`` was
    counted. A directory logs a change only when a read or a book file differs from what it
    had, and it loads the books when it applies a read, so the first change logged after the
    count has the edited books."""
    worker.wait_for_log("plans changed", 60, count=seen + 1)


def totals(engine: Engine) -> dict[str, int]:
    with engine.connect() as db:
        rows = db.execute(text("SELECT account_id, sum(amount_base_units)::bigint FROM charges GROUP BY 1"))
        return {account: int(total) for account, total in rows}


def units(amount: str) -> int:
    return int(Decimal(amount) * USDC)


def test_operator_changes_with_windows_open_never_stop_the_worker(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "default.yaml").write_bytes((REPO_ROOT / "schemas" / "pricebooks" / "default.yaml").read_bytes())
    (books / "ops.yaml").write_text(OPS, encoding="utf-8")
    (books / "ops2.yaml").write_text(OPS.replace("name: ops", "name: ops2"), encoding="utf-8")
    (books / "ops3.yaml").write_text(OPS.replace("name: ops", "name: ops3"), encoding="utf-8")  # untouched
    settings = isolated_settings(
        tmp_path,
        accounts=0,
        accounts_file=None,
        price_books_dir=books,
        window_grace="PT90S",  # windows stay open while the operator acts
        window_idle_close="PT5S",
        session_idle_timeout="PT5S",
        plans_refresh="PT1S",
    )
    engine = create_engine(sqlalchemy_url(settings))
    upsert_plans(
        engine,
        [
            {"name": "o-startup", "price_book": "ops3", "api_tier": "startup"},
            {"name": "o-doomed", "price_book": "ops", "api_tier": "doomed"},
            {"name": "o-none", "price_book": "ops"},
            {"name": "o-none3", "price_book": "ops3"},
            {"name": "o-other", "price_book": "ops2"},
        ],
    )
    accounts = {
        "acct-switch": "o-startup",
        "acct-tier": "o-doomed",
        "acct-model": "o-none",
        "acct-product": "o-none",
        "acct-book": "o-other",
        "acct-version": "o-none",
    }
    upsert_accounts(engine, list(accounts.items()))
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    first = [
        api(now, "acct-switch", 1, 10_500),
        api(now, "acct-tier", 1, 10_200),
        heartbeat(now, "acct-model", 1, "a100"),
        api(now, "acct-product", 1, product_id="gpt-4", tokens_in=100),
        heartbeat(now, "acct-book", 1, "rtx_4090"),
        api(now, "acct-book", 2, product_id="gpt-4", tokens_in=100),
        api(now, "acct-version", 1, product_id="drop", tokens_in=1000),
    ]
    worker = Worker(settings).start()
    try:
        worker.wait_for_log("took partition", 60, count=2 * settings.partitions)
        asyncio.run(publish(settings, [(str(e["subject"]).encode(), msgspec.json.encode(e)) for e in first]))
        asyncio.run(accepted(settings, len(first)))  # metered, windows open (90 s of grace)
        # The operator acts: a plan switched to one without an API tier, and the books edited.
        seen = changes_seen(worker)
        (books / "ops.yaml").write_text(EDITED, encoding="utf-8")
        (books / "ops2.yaml").unlink()
        change_plan(engine, "acct-switch", "o-none3", now + timedelta(seconds=2), actor="ops")
        reloaded(worker, seen)
        later = now + timedelta(seconds=3)
        refused = heartbeat(later, "acct-model", 2, "a100")  # a model the book lacks now
        asyncio.run(publish(settings, [(b"acct-model", msgspec.json.encode(refused))]))
        # The windows close (their grace passes by the wall clock): all but the unpriced are charged.
        deadline = time.monotonic() + 180
        letters: list[tuple[bytes, dict[str, bytes]]] = []
        while time.monotonic() < deadline and len(letters) < 5:
            time.sleep(2)
            letters = asyncio.run(dead_letters(settings))
        assert worker.alive() and worker.starts == 1
        assert "Traceback" not in worker.log() and "invalid" not in worker.log()
        reasons = sorted((h["tally.reason"], msgspec.json.decode(v)["subject"]) for v, h in letters)
        assert reasons == [
            (b"unpriced", "acct-book"),  # its product window: the book is gone
            (b"unpriced", "acct-model"),  # the heartbeat after the a100 was removed
            (b"unpriced", "acct-product"),  # gpt-4 removed
            (b"unpriced", "acct-tier"),  # tier "doomed" removed
            (b"unpriced", "acct-version"),  # the version its window was priced by is gone
        ]
        got = totals(engine)
        assert got == {
            "acct-switch": units("50") + units("5"),  # startup's fee + 500 over its quota
            "acct-model": units("0.033333"),  # a100 for a minute, priced when accepted
            "acct-book": units("0.008333"),  # its GPU minute, priced when accepted
        }
        # The books whole again, the dead letters replayed: everything is charged once.
        seen = changes_seen(worker)
        (books / "ops.yaml").write_text(OPS, encoding="utf-8")
        (books / "ops2.yaml").write_text(OPS.replace("name: ops", "name: ops2"), encoding="utf-8")
        reloaded(worker, seen)
        replay = [(msgspec.json.decode(v)["subject"].encode(), v) for v, _ in letters]
        asyncio.run(publish(settings, replay))
        due = {
            "acct-switch": units("55"),
            "acct-tier": units("50") + units("2"),  # its fee + 200 over the quota
            "acct-model": units("0.066667"),  # two a100 minutes
            "acct-product": units("0.2"),  # 100 tokens at 0.002
            "acct-book": units("0.008333") + units("0.2"),
            "acct-version": units("10"),  # 1,000 at 0.01
        }
        deadline = time.monotonic() + 120
        while totals(engine) != due and time.monotonic() < deadline:
            time.sleep(1)
        assert totals(engine) == due
        assert worker.alive() and worker.starts == 1
    finally:
        worker.stop()
        engine.dispose()
