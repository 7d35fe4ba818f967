"""The window core in-process for unit tests: events built as producers send them, a partition
that commits like the meter (changes applied per close), and price books written in the tests."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from agents.plans import AccountPlan, FixedPlans, PlanHistory, epoch_seconds
from agents.window import WindowConfig, WindowResult, Windows
from agents.window_state import GPU_SESSION, OPEN, WATERMARK, Stored
from schemas.charges import Charge
from schemas.events import UsageEvent, event_decoder
from schemas.pricebook import PriceBook, load_price_book, parse_price_book

BOOK = load_price_book(Path(__file__).resolve().parents[2] / "schemas" / "pricebooks" / "default.yaml")
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a window start (minute boundary)
CONFIG = WindowConfig(size=60, grace=300, horizon=35 * 86_400, idle_timeout=300)
RATED_AT = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)

PAYLOADS: dict[str, dict[str, Any]] = {
    "gpu.usage.v1": {
        "session_id": "s1",
        "provider_id": "prov-1",
        "node_id": "n1",
        "gpu_model": "rtx_4090",
        "vram_total_gb": "24",
        "vram_allocated_gb": "12",
        "power_watts": "350",
        "utilization": "0.5",
        "interval_seconds": 60,
    },
    "api.request.v1": {"endpoint": "/v1/chat", "request_count": 1},
    "storage.usage.v1": {
        "storage_kind": "bucket",
        "resource_id": "b1",
        "gb": "100",
        "duration_seconds": 3600,
    },
    "session.started.v1": {"session_id": "c1", "resource_tier": "medium"},
    "session.ended.v1": {"session_id": "c1", "duration_seconds": 7200},
}


def event(kind: str, at: datetime, account: str = "acct-1", serial: int = 0, **data: Any) -> UsageEvent:
    envelope = {
        "specversion": "1.0",
        "id": f"e{serial}",
        "source": "test",
        "type": kind,
        "time": at.isoformat(),
        "subject": account,
        "data": {**PAYLOADS[kind], **data},
    }
    return event_decoder.decode(msgspec.json.encode(envelope))  # validated, as ingest accepts it


def book(text: str) -> PriceBook:
    return parse_price_book(text)


def history(*changes: tuple[datetime | None, AccountPlan]) -> PlanHistory:
    """A plan history: (from when, plan); the first entry's time is ignored (since ever)."""
    return PlanHistory.of((epoch_seconds(when) if when else 0, plan) for when, plan in changes)


class Partition:
    """A window core over a dict store that commits like the meter: changes applied per close."""

    def __init__(
        self, plans: Mapping[str, AccountPlan | PlanHistory] | None = None, config: WindowConfig = CONFIG
    ) -> None:
        self.config = config
        self.store: dict[bytes, bytes] = {}
        self.charges: list[Charge] = []
        self.results: list[WindowResult] = []
        self.plans = FixedPlans(AccountPlan(BOOK))
        for account, plan in (plans or {}).items():
            self.plans.set(account, plan)
        self.windows = self.reopen()

    def reopen(self) -> Windows:
        """What a restarted worker builds from the committed state."""
        stored = Stored(
            [(k, v) for k, v in sorted(self.store.items()) if k.startswith(OPEN)],
            [(k, v) for k, v in sorted(self.store.items()) if k.startswith(GPU_SESSION)],
            int(self.store.get(WATERMARK, b"0")),
        )
        self.windows = Windows(self.config, self.plans, self.store.get, stored)
        return self.windows

    def commit(self, result: WindowResult) -> WindowResult:
        for key, value in result.changes.items():
            if value:
                self.store[key] = value
            else:
                self.store.pop(key, None)
        self.charges += result.charges
        self.results.append(result)
        return result

    def poll(self, *events: UsageEvent, wall_clock: datetime | None = None) -> WindowResult:
        self.windows.core.begin_poll(self.plans.generation)
        for e in events:
            self.windows.add(e)
        clock = int(wall_clock.timestamp()) if wall_clock else None
        return self.commit(self.windows.close(RATED_AT, clock))

    def finish(self) -> WindowResult:
        """Close every window and end every session: a wall clock a day past the watermark (and at
        least two days past T0), so later events within the horizon are still accepted."""
        watermark = datetime.fromtimestamp(self.windows.watermark, UTC)
        return self.poll(wall_clock=max(T0 + timedelta(days=2), watermark + timedelta(days=1)))

    def total(self, account: str | None = None) -> int:
        return sum(c.amount_base_units for c in self.charges if account in {None, c.account})

    def meters(self, account: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.charges:
            if account in {None, c.account}:
                out[c.meter] = out.get(c.meter, 0) + c.amount_base_units
        return out
