"""How an account is priced over time: its plan history (docs/PRICING.md, "Plans").

A plan names a price book, an API tier and the user type compute sessions are priced by. An
account's plan history lists the plans it was on and from when (whole seconds, UTC); the first
entry is in force since ever. Usage is rated by the plan in force at its event time, and by that
plan's book's version in force at the same time.

``Plans`` is what the meter asks (``pipeline.plans.PlanDirectory`` reads Postgres; ``FixedPlans``
holds them in memory for ``tally quote`` and tests). ``NativeBooks`` and ``native_book`` turn
them into the compiled core's typed values (``tally_native.PlanSpec``, ``BookSpec``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from tally_native import (
    BookSpec,
    DemandStepSpec,
    GpuRatesSpec,
    PlanSpec,
    ProductSpec,
    TierSpec,
    VersionSpec,
)

from schemas.pricebook import PriceBook, PriceBookVersion

SINCE_EVER = -(2**63)  # the effective time of a history's first plan, in epoch seconds


@dataclass(frozen=True, slots=True)
class AccountPlan:
    """What rates an account: its price book (None: unusable, ``unpriced`` says why: its usage is
    dead-lettered ``unpriced``, never rated by another book), its API tier, its compute user type."""

    book: PriceBook | None
    api_tier: str | None = None
    compute_user_type: str | None = None
    name: str | None = None
    unpriced: str | None = None


@dataclass(frozen=True, slots=True)
class PlanHistory:
    """(effective from, in epoch seconds; plan), in time order; the first from ``SINCE_EVER``."""

    entries: tuple[tuple[int, AccountPlan], ...]

    @classmethod
    def of(cls, changes: Iterable[tuple[int, AccountPlan]]) -> PlanHistory:
        ordered = sorted(changes, key=lambda change: change[0])
        if not ordered:
            raise ValueError("a plan history has at least one plan")
        return cls(((SINCE_EVER, ordered[0][1]), *ordered[1:]))

    @classmethod
    def always(cls, plan: AccountPlan) -> PlanHistory:
        return cls(((SINCE_EVER, plan),))

    def at(self, when: int) -> AccountPlan:
        """The plan in force at ``when`` (epoch seconds)."""
        current = self.entries[0][1]
        for since, plan in self.entries:
            if since > when:
                break
            current = plan
        return current

    def spans(self, start: int, end: int) -> list[tuple[int, int, AccountPlan]]:
        """The plans in force over ``[start, end)``, each with the part of it it covers."""
        out = []
        for index, (since, plan) in enumerate(self.entries):
            until = self.entries[index + 1][0] if index + 1 < len(self.entries) else end
            lo, hi = max(since, start), min(until, end)
            if lo < hi:
                out.append((lo, hi, plan))
        return out

    def next_change_after(self, when: int) -> int | None:
        return next((since for since, _ in self.entries if since > when), None)


class Plans(Protocol):
    """Where the meter finds each account's plan history."""

    @property
    def generation(self) -> int:
        """Changes whenever any history may have changed (the native core re-reads them then)."""
        ...

    @property
    def default_book(self) -> PriceBook:
        """The book of accounts without a plan."""
        ...

    def history_of(self, account: str) -> PlanHistory: ...

    def book(self, name: str) -> PriceBook | None:
        """The price book of that name as loaded now (None: it cannot be loaded)."""
        ...

    def refresh(self) -> None:
        """Take up plans read since the last call, start the next read when due; never waits (the
        meter calls it on the event loop at each poll)."""
        ...

    async def load(self) -> None:
        """Read the plans now, waiting a bounded time (a partition's start)."""
        ...


@dataclass
class FixedPlans:
    """Plan histories held in memory, ``default`` for the other accounts: ``tally quote``'s
    directory, and the meter's in tests."""

    default: AccountPlan
    plans: dict[str, PlanHistory] = field(default_factory=dict)
    generation: int = 0
    _books: dict[str, PriceBook] = field(default_factory=dict, repr=False)
    _books_at: int = field(default=-1, repr=False)

    @property
    def default_book(self) -> PriceBook:
        assert self.default.book is not None, "the default plan has a price book"
        return self.default.book

    def history_of(self, account: str) -> PlanHistory:
        history = self.plans.get(account)
        return history if history is not None else PlanHistory.always(self.default)

    def book(self, name: str) -> PriceBook | None:
        if self._books_at != self.generation:
            histories = [PlanHistory.always(self.default), *self.plans.values()]
            books = (plan.book for history in histories for _, plan in history.entries)
            self._books = {book.name: book for book in reversed(list(books)) if book is not None}
            self._books_at = self.generation
        return self._books.get(name)

    def set(self, account: str, history: PlanHistory | AccountPlan) -> None:
        """Give an account a plan (since ever) or a history; the meter sees it at its next poll."""
        self.plans[account] = history if isinstance(history, PlanHistory) else PlanHistory.always(history)
        self.generation += 1

    def refresh(self) -> None:
        return None

    async def load(self) -> None:
        return None


def epoch_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch of an aware time (its second)."""
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() // 1)


# The compiled core's view -------------------------------------------------------------------------


class NativeBooks:
    """``BookSpec`` per loaded price book, built once (a book object is immutable once loaded)."""

    def __init__(self) -> None:
        self._specs: dict[int, tuple[PriceBook, BookSpec]] = {}

    def spec(self, book: PriceBook) -> BookSpec:
        found = self._specs.get(id(book))
        if found is None or found[0] is not book:
            found = self._specs[id(book)] = (book, native_book(book))
        return found[1]

    def plans(self, history: PlanHistory) -> list[PlanSpec]:
        """An account's plan history as the native core reads it."""
        return [
            PlanSpec(
                effective_from=since,
                book=None if plan.book is None else self.spec(plan.book),
                api_tier=plan.api_tier,
                compute_user_type=plan.compute_user_type,
                unpriced=plan.unpriced,
            )
            for since, plan in history.entries
        ]


def native_book(book: PriceBook) -> BookSpec:
    """What adding usage reads of a price book (closing a window reads the book itself)."""
    return BookSpec(name=book.name, versions=[_native_version(v) for v in book.versions])


def _native_version(version: PriceBookVersion) -> VersionSpec:
    gpu = None
    if version.gpu is not None:
        rates = version.gpu
        gpu = GpuRatesSpec(
            base_rate_per_hour={model: str(rate) for model, rate in rates.base_rate_per_hour.items()},
            per_gb_hour=rates.vram_pricing == "per_gb_hour",
            vram_rate_per_gb_hour=None
            if rates.vram_rate_per_gb_hour is None
            else str(rates.vram_rate_per_gb_hour),
            power_rate_per_watt_hour=str(rates.power_rate_per_watt_hour),
            demand_multiplier=str(rates.demand_multiplier),
            demand_schedule=[
                DemandStepSpec(
                    effective_from=epoch_seconds(step.effective_from),
                    multiplier=str(step.multiplier),
                    gpu_models=step.gpu_models,
                )
                for step in rates.demand_schedule
            ],
            provider_minimum_per_hour={p: str(rate) for p, rate in rates.provider_minimum_per_hour.items()},
            billing_granularity_seconds=rates.billing_granularity_seconds,
            minimum_session_seconds=rates.minimum_session_minutes * 60,
            platform_fee_percent=str(rates.platform_fee_percent),
        )
    return VersionSpec(
        effective_from=epoch_seconds(version.effective_from),
        label=version.label,
        gpu=gpu,
        api_tiers={
            name: TierSpec(charge_failed=tier.charge_failed) for name, tier in version.api_tiers.items()
        },
        products={
            name: ProductSpec(unit=product.unit, charge_failed=product.charge_failed)
            for name, product in version.products.items()
        },
        compute_per_hour={
            user_type: {tier: str(rate) for tier, rate in tiers.items()}
            for user_type, tiers in version.compute_per_hour.items()
        },
        storage_per_gb_month={kind: str(rate) for kind, rate in version.storage_per_gb_month.items()},
    )
