"""`tally quote`: usage lines in, charges out, no Kafka and no database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TALLY = str(Path(sys.executable).with_name("tally"))


def quote(*lines: str, args: tuple[str, ...] = ()) -> list[dict[str, object]]:
    result = subprocess.run(
        [TALLY, "quote", *args], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def api(requests: int, time: str = "2026-11-24T10:00:00Z", subject: str = "acct-1") -> str:
    return json.dumps(
        {
            "type": "api.request.v1",
            "subject": subject,
            "time": time,
            "plan": "startup",
            "data": {"endpoint": "/v1/chat", "request_count": requests},
        }
    )


def test_a_periods_quota_and_overage_are_rated_across_lines_and_the_fee_once() -> None:
    out = quote(api(6000), api(6000, "2026-11-24T11:00:00Z"))
    assert out[0]["total_base_units"] == 0
    assert out[1]["total_base_units"] == 20_000_000  # 2,000 over the 10,000 included, at 0.01
    final = out[-1]
    assert final["period_fees"] == [
        {
            "subject": "acct-1",
            "plan": "startup",
            "period": "2026-11",
            "fee": "50",
            "fee_base_units": 50_000_000,
        }
    ]
    assert final["total"] == "70.000000"
    assert final["lines"] == 2 and final["errors"] == 0


def test_bad_lines_get_an_error_naming_the_field_and_the_rest_still_run() -> None:
    gpu = json.dumps(
        {
            "type": "gpu.usage.v1",
            "subject": "acct-2",
            "time": "2026-11-24T10:00:00Z",
            "data": {
                "session_id": "s",
                "provider_id": "p",
                "node_id": "n",
                "gpu_model": "rtx_4090",
                "vram_total_gb": "24",
                "vram_allocated_gb": "12",
                "power_watts": "0",
                "utilization": "0.5",
                "interval_seconds": 3600,
            },
        }
    )
    out = quote(
        api(-4),
        "not json",
        gpu,
        json.dumps({"type": "storage.usage.v1", "subject": "a", "time": "2026-11-24T10:00:00Z", "data": {}}),
    )
    assert "$.data.request_count" in str(out[0]["error"])
    assert "malformed" in str(out[1]["error"])
    assert out[2]["total_base_units"] == 250_000  # half a 24 GB card for an hour: 0.25
    assert "storage_kind" in str(out[3]["error"])
    assert out[-1]["errors"] == 3 and out[-1]["total"] == "0.250000"


def test_an_invalid_price_book_stops_with_every_problem(tmp_path: Path) -> None:
    book = tmp_path / "book.yaml"
    book.write_text("name: x\nversions:\n  - effective_from: 2026-01-01\n    one_time: {a: -1}\n")
    result = subprocess.run(
        [TALLY, "quote", "--price-book", str(book)], input="", capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "book.yaml:3" in result.stderr and "book.yaml:4" in result.stderr
