"""A small analytics data set whose every figure is known, for the stats and dashboard tests.

Two accounts on one day three days ago (UTC: recent, because the lag and balance samples live 30
days, schemas/clickhouse's TTL), written through the sink as the agent writes them:
- acct-a: 3 GPU heartbeats (a100, prov-1, 60 s each: 180 GPU-seconds), two at 10:00, one at
  11:05; 2 API requests to /v1/chat (model_inference, product gpt-4, 150 tokens each, one a 500);
- acct-b: 1 storage event (bucket, 10 GB for 3,600 s: 36,000 GB-seconds) at 10:30; 4 API
  requests to /v1/embed (api_gateway) at 11:10;
- charges: acct-a gpu 1,000,000 (fee 50,000) and its adjustment 200,000 (revision 1), product
  300; acct-b the startup tier's fee 50,000,000, its overage 0 (inside the quota), storage 10,000;
- dead letters: 2 too_late and 1 malformed_json at 10:15;
- consumer lag samples at 10:20 and balance samples at 10:00 and 11:00.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from sinks.clickhouse import ClickHouseSink

DAY = (datetime.now(UTC) - timedelta(days=3)).date()
_json = msgspec.json.Encoder()


def at(hour: int, minute: int, second: int = 0) -> str:
    return datetime(DAY.year, DAY.month, DAY.day, hour, minute, second, tzinfo=UTC).isoformat()


def _event(n: int, kind: str, time: str, subject: str, data: dict[str, object]) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"e{n}",
        "source": "dataset",
        "type": kind,
        "time": time,
        "subject": subject,
        "data": data,
        # When the agent wrote it (the accepted-per-minute panel): here 5 minutes after its time.
        "inserted_at": at(int(time[11:13]), int(time[14:16]) + 5),
    }


def gpu(n: int, time: str) -> dict[str, object]:
    data = {
        "session_id": "s1",
        "provider_id": "prov-1",
        "node_id": "n1",
        "gpu_model": "a100",
        "gpu_count": 1,
        "vram_total_gb": "80",
        "vram_allocated_gb": "40",
        "power_watts": "300",
        "utilization": "0.5",
        "interval_seconds": 60,
    }
    return _event(n, "gpu.usage.v1", time, "acct-a", data)


def api(n: int, time: str, subject: str, endpoint: str, service: str, **extra: object) -> dict[str, object]:
    data = {"endpoint": endpoint, "request_count": 1, "service_type": service, "status": 200, **extra}
    return _event(n, "api.request.v1", time, subject, data)


USAGE = [
    gpu(1, at(10, 0, 10)),
    gpu(2, at(10, 0, 40)),
    gpu(3, at(11, 5)),
    api(
        4,
        at(10, 1),
        "acct-a",
        "/v1/chat",
        "model_inference",
        product_id="gpt-4",
        tokens_in=100,
        tokens_out=50,
    ),
    api(
        5,
        at(10, 2),
        "acct-a",
        "/v1/chat",
        "model_inference",
        product_id="gpt-4",
        tokens_in=100,
        tokens_out=50,
        status=500,
    ),
    _event(
        6,
        "storage.usage.v1",
        at(10, 30),
        "acct-b",
        {"storage_kind": "bucket", "resource_id": "b1", "gb": "10", "duration_seconds": 3600},
    ),
    *(api(7 + i, at(11, 10), "acct-b", "/v1/embed", "api_gateway") for i in range(4)),
]


def charge(
    n: int, account: str, meter: str, amount: int, dims: dict[str, str], **extra: object
) -> dict[str, object]:
    return {
        "charge_id": f"00000000-0000-5000-8000-{n:012d}",
        "account": account,
        "meter": meter,
        "dimensions": dims,
        "window_start": extra.pop("window_start", at(10, 0)),
        "revision": extra.pop("revision", 0),
        "quantity": "1",
        "unit": "unit",
        "unit_price": "1",
        "amount_base_units": amount,
        "price_version": "default@2025-01-01",
        "provider_id": extra.pop("provider_id", None),
        "platform_fee_base_units": extra.pop("fee", 0),
        "rated_at": at(10, 6),
    }


GPU_DIMS = {"gpu_model": "a100", "provider_id": "prov-1"}
CHARGES = [
    charge(1, "acct-a", "gpu", 1_000_000, GPU_DIMS, provider_id="prov-1", fee=50_000),
    charge(2, "acct-a", "gpu", 200_000, GPU_DIMS, provider_id="prov-1", fee=10_000, revision=1),
    charge(3, "acct-a", "product:gpt-4", 300, {}, window_start=at(10, 1)),
    charge(4, "acct-b", "api_fee", 50_000_000, {"tier": "startup"}, window_start=at(11, 10)),
    charge(5, "acct-b", "api_overage", 0, {"tier": "startup"}, window_start=at(11, 10)),
    charge(6, "acct-b", "storage:bucket", 10_000, {}, window_start=at(10, 30)),
]
REJECTIONS = [
    {
        "time": at(10, 15),
        "reason": "too_late",
        "stage": "ingest",
        "origin": "raw/0/1",
        "detail": "old",
        "size_bytes": 10,
    },
    {
        "time": at(10, 15),
        "reason": "too_late",
        "stage": "meter",
        "origin": "raw/0/2",
        "detail": "old",
        "size_bytes": 10,
    },
    {
        "time": at(10, 15),
        "reason": "malformed_json",
        "stage": "ingest",
        "origin": "raw/0/3",
        "detail": "x",
        "size_bytes": 3,
    },
]

LAG = [
    {"time": at(10, 20), "consumer_group": "tally-meter", "topic": "usage.raw", "lag": 40},
    {"time": at(10, 20, 15), "consumer_group": "tally-meter", "topic": "usage.raw", "lag": 10},
    {"time": at(10, 20), "consumer_group": "tally-ledger", "topic": "charges", "lag": 3},
]
# acct-a is below its threshold, acct-b within 25% above it, acct-c well above (not shown).
BALANCES = [
    {
        "time": at(10, 0),
        "account": "acct-a",
        "balance_base_units": 9_000_000,
        "low_balance_threshold": 5_000_000,
    },
    {
        "time": at(11, 0),
        "account": "acct-a",
        "balance_base_units": 4_000_000,
        "low_balance_threshold": 5_000_000,
    },
    {
        "time": at(11, 0),
        "account": "acct-b",
        "balance_base_units": 6_000_000,
        "low_balance_threshold": 5_000_000,
    },
    {
        "time": at(11, 0),
        "account": "acct-c",
        "balance_base_units": 90_000_000,
        "low_balance_threshold": 5_000_000,
    },
]


def load(sink: ClickHouseSink) -> None:
    sink.insert("usage_events", [_json.encode(USAGE)], "dataset:usage")
    sink.insert("charges", [_json.encode(CHARGES)], "dataset:charges")
    sink.insert("rejections", [_json.encode(REJECTIONS)], "dataset:rejections")
    sink.insert("consumer_lag", [_json.encode(LAG)], "dataset:lag")
    sink.insert("account_balances", [_json.encode(BALANCES)], "dataset:balances")
