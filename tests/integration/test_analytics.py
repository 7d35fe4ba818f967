"""ClickHouse analytics against the real engine (chdb through clickhouse-connect) and, end to end,
a real worker on the real broker and Postgres."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from sqlalchemy import create_engine

from pipeline.loadgen import Expected, LoadPlan, default_now, generate, publish
from pipeline.oracle import accepted_events, oracle, store_plans, tier_plans
from pipeline.outputs import OutputReader
from pipeline.reconcile import reconcile
from pipeline.testing import Worker, isolated_settings, settings_env
from schemas.charges import Charge, charge_id, charges_encoder
from sinks.clickhouse import BadRowsError, ClickHouseSink, connect, endpoint_file, migrate, reader
from sinks.clickhouse_http import ClickHouseHttpServer
from sinks.postgres import account_totals, sqlalchemy_url

ROLLUPS = ("usage_1m", "usage_1h", "usage_1d", "usage_accounts_1d")
CHARGE_ROLLUPS = ("charges_1m", "charges_1h", "charges_1d", "charges_accounts_1h", "charges_accounts_1d")


@pytest.fixture
def engine_client(tmp_path: Path) -> Iterator[Client]:
    client = connect(f"chdb://{tmp_path / 'ch'}")
    assert migrate(client) == ["0001_analytics.sql", "0002_signed_amounts.sql"]
    assert migrate(client) == []  # applied once
    yield client
    client.close()


def usage_batches(events: int, seed: int = 1) -> list[bytes]:
    plan = LoadPlan(
        events=events, accounts=20, batch_size=100, bad_fraction=0, duplicate_fraction=0, seed=seed
    )
    return [m.value for m in generate(plan, default_now(), Expected())]


def amount(i: int) -> int:
    """Charge i's amount: every fifth a credit (a correction lowering its period's total)."""
    return -(1_000 + i) if i % 5 == 0 else 33_333 + i


def charge_batch(count: int) -> bytes:
    start = default_now().replace(second=0, microsecond=0)
    charges = [
        Charge(
            charge_id=charge_id(f"acct-{i % 7}", "gpu", {"gpu_model": "a100"}, start, i),
            account=f"acct-{i % 7}",
            meter="gpu",
            dimensions={"gpu_model": "a100", "provider_id": "prov-1"},
            window_start=start,
            revision=i,
            quantity="60",
            unit="gpu_hour",
            unit_price="2",
            amount_base_units=amount(i),
            price_version="default@2025-01-01",
            provider_id="prov-1",
            platform_fee_base_units=1_666 if amount(i) > 0 else -50,
        )
        for i in range(count)
    ]
    return b"[" + b",".join(charges_encoder.encode(c) for c in charges) + b"]"


def totals(client: Client) -> dict[str, int]:
    out = {"usage_events": client.query("SELECT count() FROM usage_events").result_rows[0][0]}
    for rollup in ROLLUPS:
        out[rollup] = client.query(f"SELECT sum(events) FROM {rollup}").result_rows[0][0]  # noqa: S608
    out["charges"] = client.query("SELECT sum(amount_base_units) FROM charges").result_rows[0][0]
    for rollup in CHARGE_ROLLUPS:
        out[rollup] = client.query(f"SELECT sum(amount_base_units) FROM {rollup}").result_rows[0][0]  # noqa: S608
    return out


def test_a_retried_batch_is_written_once_in_the_raw_tables_and_every_rollup(engine_client: Client) -> None:
    sink = ClickHouseSink(engine_client)
    usage = usage_batches(3_000)
    charges = [charge_batch(50)]
    sink.insert("usage_events", usage, "usage.accepted:0:0-29")
    sink.insert("charges", charges, "charges:0:0-0")
    once = totals(engine_client)
    assert once["usage_events"] == 3_000
    assert all(once[r] == 3_000 for r in ROLLUPS)
    charged = sum(amount(i) for i in range(50))
    assert once["charges"] == charged
    assert all(once[r] == charged for r in CHARGE_ROLLUPS)
    credits = "SELECT count() FROM charges WHERE billing_method = 'credit'"
    assert engine_client.query(credits).result_rows[0][0] == 10
    # The same batches again, as after a crash between insert and commit: nothing changes...
    sink.insert("usage_events", usage, "usage.accepted:0:0-29")
    sink.insert("charges", charges, "charges:0:0-0")
    assert totals(engine_client) == once
    # ...while the same rows under another token are another batch (the token is the identity).
    sink.insert("usage_events", usage[:1], "usage.accepted:0:30-30")
    again = len(msgspec.json.decode(usage[0]))
    assert totals(engine_client)["usage_events"] == 3_000 + again
    assert totals(engine_client)["usage_1d"] == 3_000 + again


def test_rows_the_engine_refuses_raise_bad_rows_and_write_nothing(engine_client: Client) -> None:
    sink = ClickHouseSink(engine_client)
    good = usage_batches(100)[0]
    with pytest.raises(BadRowsError, match="Code: "):
        sink.insert(
            "usage_events", [good, b'[{"id":"x","time":"not a time","type":"gpu.usage.v1"}]'], "bad:1"
        )
    assert totals(engine_client)["usage_events"] == 0  # the block is all or nothing


def test_readers_get_clickhouse_http_from_the_owner_and_cannot_write(
    engine_client: Client, tmp_path: Path
) -> None:
    sink = ClickHouseSink(engine_client)
    sink.insert("usage_events", usage_batches(500), "t:0:0-4")
    handle = connect(f"chdb://{tmp_path / 'ch'}")  # the readers' own handle, as the worker opens it
    loop = asyncio.new_event_loop()
    server = ClickHouseHttpServer(handle, "127.0.0.1", 0, read_only=True)
    url = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        remote = clickhouse_connect.get_client(dsn=url, compress=False, tz_mode="aware")
        query = "SELECT subject, count() FROM usage_events WHERE subject = {a:String} GROUP BY subject"
        direct = engine_client.query(query, parameters={"a": "acct-00003"}).result_rows
        assert remote.query(query, parameters={"a": "acct-00003"}).result_rows == direct
        assert direct and direct[0][1] > 0
        assert remote.query("SELECT sum(events) FROM usage_1h").result_rows == [(500,)]
        with pytest.raises(DatabaseError, match="164"):  # READONLY
            remote.command("INSERT INTO consumer_lag VALUES (now(), 'g', 't', 1)")
        with pytest.raises(DatabaseError, match="60"):  # UNKNOWN_TABLE, with the engine's message
            remote.query("SELECT * FROM no_such_table")
        # What a first-keyword check alone let through: a second statement, a comment in a
        # comment, the worker's files. The engine's readonly refuses writes whatever the text.
        for sneaky in (
            "SELECT 1; DROP TABLE usage_1h",
            "/* /* */ SELECT */ INSERT INTO consumer_lag VALUES (now(), 'g', 't', 1)",
            "SELECT * FROM file('/etc/hostname', 'LineAsString')",
            "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
        ):
            with pytest.raises(DatabaseError, match="164"):
                remote.command(sneaky)
        assert handle.query("SELECT count() FROM system.tables WHERE name = 'usage_1h'").result_rows == [(1,)]
        # A reader's settings stay in its session: this one would break every later statement.
        remote.query("SELECT 1", settings={"max_query_size": 20})
        sink.insert("usage_events", usage_batches(100, seed=2), "t:0:5-5")  # the owner still writes
        assert remote.query("SELECT count() FROM usage_events").result_rows[0][0] > 500
        remote.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        handle.close()


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_worker_writes_usage_charges_and_dead_letters_once_and_serves_readers(tmp_path: Path) -> None:
    settings = isolated_settings(
        tmp_path,
        accounts=50,
        window_idle_close="PT2S",
        window_grace="PT10S",
        analytics_batch_interval="PT0.5S",
        analytics_sample_interval="PT2S",
    )
    engine = create_engine(sqlalchemy_url(settings))
    plans = tier_plans([f"acct-{i:05d}" for i in range(50)])
    store_plans(engine, plans)
    expected = Expected()
    plan = LoadPlan(events=20_000, accounts=50, batch_size=100, seed=5, ordered_time=True, time_span_s=120)
    messages = list(generate(plan, default_now(), expected))
    want = oracle(settings, accepted_events(messages, expected), plans)
    worker = Worker(settings, "analytics-1").start()
    try:
        worker.wait_for_log("analytics: serving", 120)
        published = endpoint_file(settings.clickhouse_url)
        assert published.read_text().startswith("http://127.0.0.1:")

        async def run() -> None:
            async with OutputReader(settings, keep_identities=False) as outputs:
                await outputs.start_from(await outputs.snapshot())
                await publish(settings, messages)
                await outputs.read_until(
                    len(expected.accepted) + sum(expected.rejected.values()), idle_timeout_s=90
                )

        asyncio.run(run())
        client = reader(settings.clickhouse_url)  # the worker holds the path: readers go over HTTP
        assert type(client).__name__ == "HttpClient"

        def settled() -> bool:
            # Every window closed and in Postgres (the reference rating), then ClickHouse equal to it.
            return (
                account_totals(engine) == want
                and not reconcile(engine, client)
                and (
                    client.query("SELECT count() FROM usage_events").result_rows[0][0]
                    == len(expected.accepted)
                )
            )

        wait_for(settled, 120, "ClickHouse to hold every accepted event and charge")
        got = totals(client)
        assert got["usage_events"] == len(expected.accepted)
        assert all(got[r] == len(expected.accepted) for r in ROLLUPS)
        assert got["charges"] == sum(account_totals(engine).values())
        assert all(got[r] == got["charges"] for r in CHARGE_ROLLUPS)
        distinct = client.query("SELECT uniqExact(source, id) FROM usage_events").result_rows[0][0]
        assert distinct == len(expected.accepted)  # duplicates were dropped before ClickHouse
        rows = client.query("SELECT reason, sum(rejections) FROM rejections_1m GROUP BY reason").result_rows
        assert Counter({reason: count for reason, count in rows}) == expected.rejected
        wait_for(
            lambda: client.query("SELECT uniqExact(consumer_group) FROM consumer_lag").result_rows[0][0] == 3,
            30,
            "a consumer lag sample of the three stages",
        )
        charged = account_totals(engine)

        def balances_sampled() -> bool:
            rows = client.query(
                "SELECT account, argMax(balance_base_units, time) FROM account_balances GROUP BY account"
            ).result_rows
            return {account: -balance for account, balance in rows if balance} == charged

        wait_for(balances_sampled, 30, "a balance sample equal to minus each account's charges")
        # `tally reconcile`, as an operator runs it while the worker holds the path: exit 0.
        command = [sys.executable, "-m", "pipeline.cli", "reconcile", "--json"]
        env = settings_env(settings)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert (done.returncode, done.stdout) == (0, ""), done.stderr[-2000:]
        client.close()
    finally:
        worker.stop()
        engine.dispose()
    assert not endpoint_file(settings.clickhouse_url).exists()  # a stopped owner withdraws its address
