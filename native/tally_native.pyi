"""Types of the compiled meter hot path (native/src): see native/README.md."""

from collections.abc import Callable, Sequence
from typing import Protocol

class _Record(Protocol):
    @property
    def value(self) -> bytes | None: ...
    @property
    def offset(self) -> int: ...

Entries = list[tuple[bytes, bytes]]

class DemandStepSpec:
    def __init__(self, *, effective_from: int, multiplier: str, gpu_models: list[str] | None) -> None: ...

class GpuRatesSpec:
    def __init__(
        self,
        *,
        base_rate_per_hour: dict[str, str],
        per_gb_hour: bool,
        vram_rate_per_gb_hour: str | None,
        power_rate_per_watt_hour: str,
        demand_multiplier: str,
        demand_schedule: list[DemandStepSpec],
        provider_minimum_per_hour: dict[str, str],
        billing_granularity_seconds: int,
        minimum_session_seconds: int,
        platform_fee_percent: str,
    ) -> None: ...

class TierSpec:
    def __init__(self, *, charge_failed: bool) -> None: ...

class ProductSpec:
    def __init__(self, *, unit: str, charge_failed: bool) -> None: ...

class VersionSpec:
    def __init__(
        self,
        *,
        effective_from: int,
        label: str,
        gpu: GpuRatesSpec | None,
        api_tiers: dict[str, TierSpec],
        products: dict[str, ProductSpec],
        compute_per_hour: dict[str, dict[str, str]],
        storage_per_gb_month: dict[str, str],
    ) -> None: ...

class BookSpec:
    def __init__(self, *, name: str, versions: list[VersionSpec]) -> None: ...
    @property
    def name(self) -> str: ...

class PlanSpec:
    def __init__(
        self,
        *,
        effective_from: int,
        book: BookSpec | None,
        api_tier: str | None,
        compute_user_type: str | None,
        unpriced: str | None = None,
    ) -> None: ...

class WindowCore:
    def __init__(
        self,
        *,
        size: int,
        grace: int,
        horizon: int,
        idle_timeout: int,
        plan_of: Callable[[str], list[PlanSpec]],
        read: Callable[[bytes], bytes | None],
        open_windows: Sequence[tuple[bytes, bytes]],
        gpu_sessions: Sequence[tuple[bytes, bytes]],
        watermark: int,
    ) -> None: ...
    @property
    def watermark(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def running_sessions(self) -> int: ...
    @property
    def interned(self) -> int: ...
    def begin_poll(self, generation: int) -> None: ...
    def add(self, body: bytes) -> tuple[str, str] | None: ...
    def close(self, wall_clock: int | None) -> tuple[Entries, Entries]: ...
    def changes(self) -> Entries: ...
    def open_windows(self) -> Entries: ...

class PollOutput:
    @property
    def accepted(self) -> list[bytes]: ...
    @property
    def forwarded(self) -> list[tuple[int, bytes]]: ...
    @property
    def marks(self) -> Entries: ...
    @property
    def mark_records(self) -> list[bytes]: ...
    @property
    def rejections(self) -> list[tuple[str, str, bytes, int]]: ...
    @property
    def accepted_count(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def forwarded_count(self) -> int: ...

class MeterCore:
    def __init__(
        self,
        windows: WindowCore,
        partition: int,
        partitions: int,
        max_message_bytes: int,
        max_event_bytes: int,
        batch_bytes: int,
        marks_record_bytes: int,
        known_accounts: frozenset[str] | None,
        max_quantity: str,
        read: Callable[[bytes], bytes | None],
        read_many: Callable[[list[bytes]], list[bytes | None]],
    ) -> None: ...
    def begin(self, earliest_us: int, latest_us: int, plans_generation: int) -> None: ...
    def ingest(self, records: Sequence[_Record], start: int) -> int: ...
    def accept(self, partition: int, records: list[tuple[bytes, bytes, bytes]], offset: int) -> None: ...
    def take(self) -> PollOutput: ...

def schema() -> list[tuple[str, list[tuple[str, str, bool, str]]]]: ...
def decimal_op(op: str, lhs: str, rhs: str) -> str | None: ...
def utc_time(text: bytes) -> tuple[str, str] | None: ...
def route(account: bytes, partitions: int, body: bytes) -> tuple[int, bytes]: ...
