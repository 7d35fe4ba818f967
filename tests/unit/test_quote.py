"""`tally quote`: usage events in, the meter's own charges out, no Kafka and no database.

Amounts are written from docs/PRICING.md's rules; tests/integration/test_charge_rules.py holds the
quote to a running worker's charges for the same events.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

TALLY = str(Path(sys.executable).with_name("tally"))


def quote(*lines: str, args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    result = subprocess.run(
        [TALLY, "quote", *args], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def api(requests: int, time: str = "2026-11-24T10:00:00Z", subject: str = "acct-1", **data: Any) -> str:
    return json.dumps(
        {
            "type": "api.request.v1",
            "subject": subject,
            "time": time,
            "plan": "startup",
            "data": {"endpoint": "/v1/chat", "request_count": requests, **data},
        }
    )


def gpu(time: str = "2026-11-24T10:00:00Z", seconds: int = 3600, **data: Any) -> str:
    heartbeat = {
        "session_id": "s",
        "provider_id": "p",
        "node_id": "n",
        "gpu_model": "rtx_4090",
        "vram_total_gb": "24",
        "vram_allocated_gb": "12",
        "power_watts": "0",
        "utilization": "0.5",
        "interval_seconds": seconds,
        **data,
    }
    return json.dumps({"type": "gpu.usage.v1", "subject": "acct-2", "time": time, "data": heartbeat})


def test_a_periods_quota_and_overage_are_rated_across_lines_and_the_fee_once() -> None:
    *charges, summary = quote(api(6000), api(6000, "2026-11-24T11:00:00Z"))
    assert [(c["meter"], c["amount_base_units"]) for c in charges] == [
        ("api_fee", 50_000_000),
        ("api_overage", 0),
        ("api_overage", 20_000_000),  # 2,000 over the 10,000 included, at 0.01
    ]
    assert summary["total"] == "70.000000" and summary["events"] == 2 and summary["errors"] == 0


def test_bad_lines_get_their_reason_naming_the_field_and_the_rest_still_run() -> None:
    storage = {"type": "storage.usage.v1", "subject": "a", "time": "2026-11-24T10:00:00Z", "data": {}}
    *out, summary = quote(
        api(-4),
        "not json",
        gpu(),
        json.dumps(storage),
        gpu(vram_allocated_gb="100", vram_total_gb="80"),
        gpu(utilization="7"),
    )
    errors = {e["line"]: (e["error"], e["detail"]) for e in out if "error" in e}
    assert errors[1][0] == "negative_quantity" and "$.data.request_count" in errors[1][1]
    assert errors[2][0] == "malformed_json"
    assert errors[4][0] == "schema_violation" and "storage_kind" in errors[4][1]
    assert errors[5] == ("schema_violation", "vram_allocated_gb exceeds vram_total_gb - at `$.data`")
    assert errors[6][0] == "schema_violation" and "utilization" in errors[6][1]
    [line] = [c for c in out if "meter" in c]
    assert line["amount_base_units"] == 250_000  # half a 24 GB card for an hour: 0.25
    # The ledger's split of a GPU line: 5% platform fee, the rest the provider's.
    assert (line["platform_fee_base_units"], line["provider_earnings_base_units"]) == (12_500, 237_500)
    assert summary["errors"] == 5 and summary["total"] == "0.250000"


def test_an_offset_time_belongs_to_the_utc_month_it_falls_in() -> None:
    """2026-12-01T01:00:00+02:00 is November 30, 23:00 UTC: November's fee."""
    *charges, _ = quote(api(1, "2026-12-01T01:00:00+02:00"))
    [fee] = [c for c in charges if c["meter"] == "api_fee"]
    assert fee["window_start"] == "2026-11-01T00:00:00+00:00"


def test_a_free_allowance_counts_across_the_period() -> None:
    lines = [
        json.dumps(
            {
                "type": "api.request.v1",
                "subject": "acct-3",
                "time": f"2026-11-24T10:0{i}:00Z",
                "data": {"endpoint": "/v1", "request_count": 0, "product_id": "claude-3", "tokens_in": n},
            }
        )
        for i, n in enumerate([600, 600, 1600])
    ]
    *_, summary = quote(*lines)
    assert summary["total"] == "2.700000"  # (2,800 - 1,000 included) x 0.0015


def test_the_provider_minimum_and_demand_come_from_the_book(tmp_path: Path) -> None:
    book = tmp_path / "floors.yaml"
    book.write_text(
        """name: floors
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu:
      base_rate_per_hour: {rtx_4090: "0.50"}
      power_rate_per_watt_hour: "0"
      provider_minimum_per_hour: {p: "1.20"}
      demand_schedule: [{effective_from: "2026-11-24T11:00:00Z", multiplier: "2"}]
""",
        encoding="utf-8",
    )
    *_, summary = quote(
        gpu(vram_allocated_gb="6"),  # a quarter card: 0.125/h, floored at 1.20/h for an hour
        gpu("2026-11-24T11:00:00Z", 3600, session_id="t", provider_id="q"),  # half: 0.25 x 2
        args=("--price-book", str(book)),
    )
    assert summary["accounts"] == {"acct-2": 1_200_000 + 500_000}


def test_an_invalid_price_book_stops_with_every_problem(tmp_path: Path) -> None:
    book = tmp_path / "book.yaml"
    book.write_text("name: x\nversions:\n  - effective_from: 2026-01-01\n    one_time: {a: -1}\n")
    result = subprocess.run(
        [TALLY, "quote", "--price-book", str(book)], input="", capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "book.yaml:3" in result.stderr and "book.yaml:4" in result.stderr
