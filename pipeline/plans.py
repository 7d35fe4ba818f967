"""Which price book and API tier rate an account: Postgres plans + price-book files.

The meter asks ``plan_of(account)`` per event, so the answer is a dict lookup; the directory is
re-read from Postgres every ``plans_refresh`` (30 s by default), and when Postgres cannot be
reached the meter keeps rating with the plans it has (a stale plan is better than a stalled meter;
a plan change takes effect for windows closed after the next successful read).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import OperationalError

from agents.window import AccountPlan
from pipeline.settings import Settings
from schemas.pricebook import PriceBook, load_price_book
from sinks.postgres import account_plans, sqlalchemy_url

log = logging.getLogger(__name__)


class PlanDirectory:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or create_engine(sqlalchemy_url(settings), pool_size=1, max_overflow=0)
        self._books: dict[str, PriceBook] = {}
        self.default = AccountPlan(self.book(settings.default_price_book))
        self._plans: dict[str, AccountPlan] = {}
        self._read_at: float | None = None  # monotonic seconds of the last read; None: never

    def book(self, name: str) -> PriceBook:
        """The price book ``<name>.yaml`` (loaded once; a bad file raises ``PriceBookError``)."""
        book = self._books.get(name)
        if book is None:
            book = self._books[name] = load_price_book(self.settings.price_books_dir / f"{name}.yaml")
        return book

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        fresh = (
            self._read_at is not None and now - self._read_at < self.settings.plans_refresh.total_seconds()
        )
        if fresh and not force:
            return
        try:
            rows = account_plans(self.engine)
        except OperationalError as exc:
            log.warning("meter: cannot read account plans (%s); keeping the ones loaded", exc.orig)
            return
        plans: dict[str, AccountPlan] = {}
        for account, (book_name, api_tier, user_type) in rows.items():
            try:
                plans[account] = AccountPlan(self.book(book_name), api_tier, user_type)
            except (OSError, ValueError) as exc:
                log.error(
                    "meter: account %s: price book %r unusable (%s); rating it with the default",
                    account,
                    book_name,
                    exc,
                )
        self._plans = plans
        self._read_at = now

    def plan_of(self, account: str) -> AccountPlan:
        return self._plans.get(account, self.default)

    def close(self) -> None:
        self.engine.dispose()


class FixedPlans:
    """Plans from a dict, the default book for the rest: a testing source (no Postgres) for
    the meter's unit tests and in-process runs."""

    def __init__(self, default: AccountPlan, plans: dict[str, AccountPlan] | None = None) -> None:
        self.default = default
        self.plans = plans or {}

    def plan_of(self, account: str) -> AccountPlan:
        return self.plans.get(account, self.default)

    def refresh(self, force: bool = False) -> None:
        return None
