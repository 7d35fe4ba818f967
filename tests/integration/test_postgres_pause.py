"""A Postgres that stops answering does not stop the worker (real Kafka and Postgres): the plan
directory reads off the event loop, so every stage's consumer keeps its heartbeats and its
partitions, the meter goes on rating with the plans it has, and once Postgres answers again the
ledger's totals are exact.

Postgres is paused with SIGSTOP (the server and every backend: a connection then hangs without an
error, as behind a network that drops packets) for three consumer session timeouts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from sqlalchemy import Engine, create_engine, text

from pipeline.settings import REPO_ROOT
from pipeline.testing import Worker, isolated_settings
from sinks.postgres import sqlalchemy_url, upsert_accounts, upsert_plans
from tests.integration.test_operator_changes import accepted, api, publish, totals, units

BOOK = """name: pause
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    products:
      tokens: {pricing: {model: per_unit, unit_price: "0.002"}}
"""
ACCOUNTS = [f"acct-pause-{n}" for n in range(4)]


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_postgres(pid: int) -> bool:
    return Path(f"/proc/{pid}/comm").read_text(encoding="ascii", errors="replace").startswith("postgres")


def pause_postgres(engine: Engine) -> list[int]:
    """SIGSTOP the Postgres ``engine`` talks to (it must run on this host, as `make up` starts it):
    the server (the parent of this connection's backend) first, so that it forks no backend
    meanwhile, then every child of it. Returns the processes stopped."""
    with engine.connect() as db:
        backend = db.execute(text("SELECT pg_backend_pid()")).scalar_one()
    server = _parent(backend)
    assert _is_postgres(backend) and _is_postgres(server), (
        "this test pauses a Postgres server on this host: run the local one (make up)"
    )
    signal_all([server], signal.SIGSTOP)
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent(int(entry.name)) == server:
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    signal_all(children, signal.SIGSTOP)
    return [server, *children]


def signal_all(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            continue  # gone meanwhile


def batch(at: datetime, serial: int) -> list[tuple[bytes, bytes]]:
    """One request of 100 tokens per account (0.2 each at 0.002)."""
    events = [api(at, account, serial, product_id="tokens", tokens_in=100) for account in ACCOUNTS]
    return [(str(e["subject"]).encode(), msgspec.json.encode(e)) for e in events]


def test_a_paused_postgres_costs_no_partition_and_no_charge(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "default.yaml").write_bytes((REPO_ROOT / "schemas" / "pricebooks" / "default.yaml").read_bytes())
    (books / "pause.yaml").write_text(BOOK, encoding="utf-8")
    settings = isolated_settings(
        tmp_path,
        accounts=0,
        accounts_file=None,
        price_books_dir=books,
        window_grace="PT2S",
        window_idle_close="PT2S",
        plans_refresh="PT1S",  # the meter reads plans every second: many reads meet the pause
        plans_read_timeout="PT2S",
    )
    pause_s = 3 * settings.session_timeout_ms / 1000
    engine = create_engine(sqlalchemy_url(settings))
    upsert_plans(engine, [{"name": "p-tokens", "price_book": "pause"}])
    upsert_accounts(engine, [(account, "p-tokens") for account in ACCOUNTS])
    worker = Worker(settings).start()
    paused: list[int] = []
    try:
        partitions = 2 * settings.partitions  # the meter's and the ledger's
        worker.wait_for_log("took partition", 60, count=partitions)
        # Usage of a few minutes ago: its windows close by the wall clock as soon as the partition
        # is idle (window_idle_close), not at the end of the current minute.
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
        asyncio.run(publish(settings, batch(base, 0)))
        deadline = time.monotonic() + 60
        while totals(engine) != dict.fromkeys(ACCOUNTS, units("0.2")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert totals(engine) == dict.fromkeys(ACCOUNTS, units("0.2"))

        paused = pause_postgres(engine)
        stopped_at = time.monotonic()
        sent = 0
        while time.monotonic() - stopped_at < pause_s:
            sent += 1
            asyncio.run(publish(settings, batch(base + timedelta(seconds=sent), sent)))
            time.sleep(1)  # a batch a second: the meter polls, and its plans come due, all through
        # Still paused: the meter has rated every batch, so no plan read held its loop.
        asyncio.run(accepted(settings, (1 + sent) * len(ACCOUNTS)))
        signal_all(paused, signal.SIGCONT)
        paused = []

        asyncio.run(publish(settings, batch(base + timedelta(seconds=sent + 1), sent + 1)))
        due = dict.fromkeys(ACCOUNTS, (sent + 2) * units("0.2"))  # 100 tokens a batch, at 0.002
        deadline = time.monotonic() + 120
        while totals(engine) != due and time.monotonic() < deadline:
            time.sleep(0.5)
        assert totals(engine) == due
        log = worker.log()
        assert worker.alive() and worker.starts == 1
        assert log.count("took partition") == partitions, "a partition moved during the pause"
        assert "released partition" not in log
        assert "Traceback" not in log
    finally:
        signal_all(paused, signal.SIGCONT)
        worker.stop()
        engine.dispose()
