"""bench/analytics: rows/s into ClickHouse through the sink, and the dashboards' query latency.

One run, on the embedded engine (chdb, a fresh path) with the DDL applied:
1. sink: 10,000,000 synthetic usage events (the load generator's mix: 1,000 accounts, GPU, API,
   storage and session events, ascending over the last 30 days), written as the analytics agent
   writes them: ``ClickHouseSink.insert`` of 100 messages of 1,000 events per insert (100,000
   rows), each insert with its own token; only the insert calls are timed (the rows are generated
   between them). Then 1,000,000 charges, 100,000 dead letters, 3 days of consumer-lag samples
   and 3 hours of balance samples, for the other panels;
2. dashboards: every panel of deploy/grafana/dashboards, macros expanded (pipeline.dashboards),
   over each range a user picks (revenue and usage: 6 h, 24 h, 7 and 30 days; pipeline health: 1,
   3 and 24 hours), 20 times each after one warm-up run, through the same client; p50 and p95.
Results: ``bench/results/analytics-10m.json`` and the table in ``bench/README.md``.
Targets (this 2-core machine): sink >= 200,000 rows/s; every dashboard query p95 <= 100 ms.
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from bench.ingest import machine, replace_table, run_benches
from pipeline.dashboards import expand, panels
from pipeline.loadgen import Expected, LoadPlan, account_ids, generate
from sinks.clickhouse import ClickHouseSink, connect, migrate

SHAPES = {"10m": 10_000_000}
SINK_TARGET = 200_000
P95_TARGET_MS = 100.0
ROWS_PER_INSERT = 100_000
EVENTS_PER_MESSAGE = 1_000
DAYS = 30
QUERY_RUNS = 20
RANGES = {
    "Tally: revenue and usage": {"6h": 6, "24h": 24, "7d": 7 * 24, "30d": 30 * 24},
    "Tally: pipeline health and balances": {"1h": 1, "3h": 3, "24h": 24},
}
_json = msgspec.json.Encoder()


def load_usage(sink: ClickHouseSink, events: int, end: datetime) -> tuple[int, float]:
    """Insert ``events`` usage rows in 100,000-row inserts; (rows, seconds spent in inserts)."""
    chunks = events // ROWS_PER_INSERT
    span = DAYS * 86_400 // chunks
    rows, seconds = 0, 0.0
    for i in range(chunks):
        plan = LoadPlan(
            ROWS_PER_INSERT,
            1_000,
            duplicate_fraction=0,
            bad_fraction=0,
            wrong_key_fraction=0,
            batch_size=EVENTS_PER_MESSAGE,
            seed=i,
            ordered_time=True,
            time_span_s=span,
        )
        arrays = [
            m.value for m in generate(plan, end - timedelta(seconds=span * (chunks - 1 - i)), Expected())
        ]
        started = time.perf_counter()
        sink.insert("usage_events", arrays, f"bench:usage:{i}")
        seconds += time.perf_counter() - started
        rows += ROWS_PER_INSERT
        if i % 10 == 9:
            print(f"[sink] {rows:,} rows, {rows / seconds:,.0f} rows/s in inserts", flush=True)
    return rows, seconds


def charge_rows(count: int, end: datetime, rng: random.Random) -> list[dict[str, Any]]:
    accounts = account_ids(1_000)
    meters = [
        ("gpu", {"gpu_model": "a100", "provider_id": "prov-03"}, "prov-03"),
        ("gpu", {"gpu_model": "h100", "provider_id": "prov-07"}, "prov-07"),
        ("api_overage", {"tier": "growth"}, None),
        ("product:gpt-4", {}, None),
        ("storage:bucket", {}, None),
    ]
    rows = []
    for n in range(count):
        meter, dims, provider = meters[n % len(meters)]
        start = end - timedelta(seconds=rng.randrange(DAYS * 86_400))
        amount = rng.randrange(0, 5_000_000)
        rows.append(
            {
                "charge_id": f"00000000-0000-5000-8000-{n:012d}",
                "account": accounts[rng.randrange(len(accounts))],
                "meter": meter,
                "dimensions": dims,
                "window_start": start.replace(second=0, microsecond=0).isoformat(),
                "revision": 0,
                "quantity": str(rng.randrange(1, 1000)),
                "unit": "unit",
                "unit_price": "0.01",
                "amount_base_units": amount,
                "price_version": "default@2025-01-01",
                "provider_id": provider,
                "platform_fee_base_units": amount // 20 if provider else 0,
            }
        )
    return rows


def load_the_rest(sink: ClickHouseSink, end: datetime) -> None:
    rng = random.Random(5)
    for i in range(10):
        sink.insert("charges", [_json.encode(charge_rows(100_000, end, rng))], f"bench:charges:{i}")
    reasons = ["malformed_json", "schema_violation", "too_late", "id_conflict", "unpriced"]
    rejections = [
        {
            "time": (end - timedelta(seconds=rng.randrange(DAYS * 86_400))).isoformat(),
            "reason": reasons[n % len(reasons)],
            "stage": "ingest",
            "origin": f"usage.raw/0/{n}",
            "detail": "synthetic",
            "size_bytes": 300,
        }
        for n in range(100_000)
    ]
    sink.insert("rejections", [_json.encode(rejections)], "bench:rejections")
    groups = [("tally-meter", "usage.raw"), ("tally-ledger", "charges")]
    lag = [
        {
            "time": (end - timedelta(seconds=15 * k)).isoformat(),
            "consumer_group": g,
            "topic": t,
            "lag": rng.randrange(500),
        }
        for k in range(3 * 86_400 // 15)
        for g, t in groups
    ]
    sink.insert("consumer_lag", [_json.encode(lag)], "bench:lag")
    accounts = account_ids(1_000)
    balances = [
        {
            "time": (end - timedelta(seconds=15 * k)).isoformat(),
            "account": account,
            "balance_base_units": rng.randrange(-1_000_000, 100_000_000),
            "low_balance_threshold": 5_000_000,
        }
        for k in range(3 * 3_600 // 15)
        for account in accounts
    ]
    sink.insert("account_balances", [_json.encode(balances)], "bench:balances")


def time_queries(sink: ClickHouseSink, end: datetime) -> list[dict[str, Any]]:
    results = []
    for panel in panels():
        for label, hours in RANGES[panel.dashboard].items():
            interval = max(60, hours * 3_600 // 300)  # ~300 points, as Grafana asks for
            sql = expand(panel.sql, end - timedelta(hours=hours), end, interval)
            rows = len(sink.client.query(sql).result_rows)  # warm-up, and the size of the answer
            times = []
            for _ in range(QUERY_RUNS):
                started = time.perf_counter()
                sink.client.query(sql)
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            p95 = times[int(0.95 * len(times)) - 1]
            results.append(
                {
                    "panel": panel.title,
                    "range": label,
                    "rows_returned": rows,
                    "p50_ms": round(statistics.median(times), 1),
                    "p95_ms": round(p95, 1),
                }
            )
            print(
                f"[query] {panel.title} / {label}: p50 {results[-1]['p50_ms']} ms, p95 {p95:.1f} ms",
                flush=True,
            )
    return results


def run_shape(shape: str, work: Path) -> dict[str, Any]:
    path = work / f"chdb-{int(time.time())}"
    client = connect(f"chdb://{path}")
    try:
        migrate(client)
        sink = ClickHouseSink(client)
        end = datetime.now(UTC).replace(microsecond=0)
        rows, seconds = load_usage(sink, SHAPES[shape], end)
        load_the_rest(sink, end)
        counts = {
            table: client.query(f"SELECT count() FROM {table}").result_rows[0][0]  # noqa: S608  # constants
            for table in ("usage_events", "usage_1m", "usage_1h", "usage_1d", "charges_1h", "charges_1d")
        }
        print(f"[tables] rows: {counts}", flush=True)
        queries = time_queries(sink, end)
    finally:
        client.close()
    worst = max(q["p95_ms"] for q in queries)
    sink_rate = rows / seconds
    return {
        "name": f"analytics-{shape}",
        "usage_rows": rows,
        "sink_rows_per_s": round(sink_rate),
        "rows_per_insert": ROWS_PER_INSERT,
        "table_rows": counts,
        "queries": queries,
        "worst_p95_ms": worst,
        "target_sink_rows_per_s": SINK_TARGET,
        "target_p95_ms": P95_TARGET_MS,
        "meets_target": sink_rate >= SINK_TARGET and worst <= P95_TARGET_MS,
        "machine": machine(),
    }


def write_readme(results: list[dict[str, Any]]) -> None:
    rows = [
        "| bench | usage rows | sink rows/s | worst dashboard p95 | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        verdict = "met" if r["meets_target"] else "MISSED"
        rows.append(
            f"| {r['name']} | {r['usage_rows']:,} | {r['sink_rows_per_s']:,} | {r['worst_p95_ms']} ms "
            f"| >= {r['target_sink_rows_per_s']:,} rows/s, p95 <= {r['target_p95_ms']:.0f} ms: {verdict} |"
        )
    rows += ["", "| panel | range | rows returned | p50 ms | p95 ms |", "|---|---|---:|---:|---:|"]
    for r in results:
        for q in r["queries"]:
            rows.append(
                f"| {q['panel']} | {q['range']} | {q['rows_returned']} | {q['p50_ms']} | {q['p95_ms']} |"
            )
    replace_table("analytics", rows)


def main() -> None:
    run_benches("analytics", SHAPES, run_shape, write_readme)


if __name__ == "__main__":
    main()
