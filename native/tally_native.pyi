"""Types of the compiled meter hot path (native/src): see native/README.md. `make lint` holds this
stub to the built extension (mypy's stubtest)."""

from collections.abc import Callable, Sequence
from typing import Protocol, Self, final

__all__ = [
    "BookSpec",
    "DemandStepSpec",
    "GpuRatesSpec",
    "MeterCore",
    "PlanSpec",
    "PollOutput",
    "ProductSpec",
    "TierSpec",
    "VersionSpec",
    "WindowCore",
    "decimal_op",
    "route",
    "schema",
    "utc_time",
]

class _Record(Protocol):
    @property
    def value(self) -> bytes | None: ...
    @property
    def offset(self) -> int: ...

_Entries = list[tuple[bytes, bytes]]

@final
class DemandStepSpec:
    def __new__(cls, *, effective_from: int, multiplier: str, gpu_models: list[str] | None) -> Self: ...

@final
class GpuRatesSpec:
    def __new__(
        cls,
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
    ) -> Self: ...

@final
class TierSpec:
    def __new__(cls, *, charge_failed: bool) -> Self: ...

@final
class ProductSpec:
    def __new__(cls, *, unit: str, charge_failed: bool) -> Self: ...

@final
class VersionSpec:
    def __new__(
        cls,
        *,
        effective_from: int,
        label: str,
        gpu: GpuRatesSpec | None,
        api_tiers: dict[str, TierSpec],
        products: dict[str, ProductSpec],
        compute_per_hour: dict[str, dict[str, str]],
        storage_per_gb_month: dict[str, str],
    ) -> Self: ...

@final
class BookSpec:
    def __new__(cls, *, name: str, versions: list[VersionSpec]) -> Self: ...
    @property
    def name(self) -> str: ...

@final
class PlanSpec:
    def __new__(
        cls,
        *,
        effective_from: int,
        book: BookSpec | None,
        api_tier: str | None,
        compute_user_type: str | None,
        unpriced: str | None = None,
    ) -> Self: ...

@final
class WindowCore:
    def __new__(
        cls,
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
    ) -> Self: ...
    @property
    def watermark(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def running_sessions(self) -> int: ...
    @property
    def interned(self) -> int: ...
    def begin_poll(self, generation: int) -> None: ...
    def add(self, body: bytes) -> tuple[str, str] | None: ...
    def close(self, wall_clock: int | None) -> tuple[_Entries, _Entries]: ...
    def changes(self) -> _Entries: ...
    def open_windows(self) -> _Entries: ...

@final
class PollOutput:
    @property
    def accepted(self) -> list[bytes]: ...
    @property
    def forwarded(self) -> list[tuple[int, bytes]]: ...
    @property
    def marks(self) -> _Entries: ...
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

@final
class MeterCore:
    def __new__(
        cls,
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
    ) -> Self: ...
    def begin(self, earliest_us: int, latest_us: int, plans_generation: int) -> None: ...
    def ingest(self, records: Sequence[_Record], start: int) -> int: ...
    def accept(self, partition: int, records: list[tuple[bytes, bytes, bytes]], offset: int) -> None: ...
    def take(self) -> PollOutput: ...

def schema() -> list[tuple[str, list[tuple[str, str, bool, str]]]]: ...
def decimal_op(op: str, lhs: str, rhs: str) -> str | None: ...
def utc_time(text: bytes) -> tuple[str, str] | None: ...
def route(account: bytes, partitions: int, body: bytes) -> tuple[int, bytes]: ...
