"""Which plans rate an account over time: Postgres plan histories + price-book files.

The meter reads ``history_of(account)`` once per account whenever ``generation`` changes, so the
answer is a dict lookup; the directory is re-read from Postgres every ``plans_refresh`` (30 s by
default), and a price-book file whose content changed is loaded again. When
Postgres cannot be reached the meter keeps rating with the plans it has (a stale plan is better
than a stalled meter; a plan change takes effect for usage rated after the next successful read,
at the change's own effective time, so usage before it keeps its old plan).

A plan whose price book cannot be used (its file is gone) prices nothing: the account's usage is
dead-lettered ``unpriced`` with the reason, never rated by another book. A book file edited into
an invalid one keeps its last valid content (logged), so an operator's typo does not stop billing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import OperationalError

from agents.plans import AccountPlan, PlanHistory, epoch_seconds
from pipeline.settings import Settings
from schemas.pricebook import PriceBook, PriceBookError, parse_price_book
from sinks.postgres import PlanRow, plan_histories, sqlalchemy_url

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Loaded:
    book: PriceBook | None
    stamp: bytes | None  # a digest of the file's content when read; None: no file
    problem: str | None


class PlanDirectory:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or create_engine(sqlalchemy_url(settings), pool_size=1, max_overflow=0)
        self._books: dict[str, _Loaded] = {}
        default = self._load(settings.default_price_book)
        if default.book is None:
            raise PriceBookError([f"{settings.default_price_book}: {default.problem}"])
        self._default_book = default.book
        self.default = AccountPlan(default.book)
        self._histories: dict[str, PlanHistory] = {}
        self._rows: dict[str, list[PlanRow]] = {}
        self.generation = 0
        self._read_at: float | None = None  # monotonic seconds of the last read; None: never

    @property
    def default_book(self) -> PriceBook:
        return self._default_book

    def _path(self, name: str) -> Path:
        return self.settings.price_books_dir / f"{name}.yaml"

    def _load(self, name: str) -> _Loaded:
        path = self._path(name)
        previous = self._books.get(name)
        try:
            content = path.read_bytes()
        except OSError as exc:
            loaded = _Loaded(None, None, f"price book {name!r} cannot be read ({exc.strerror})")
        else:
            stamp = hashlib.blake2b(content, digest_size=16).digest()
            if previous is not None and previous.stamp == stamp:
                return previous
            try:
                loaded = _Loaded(parse_price_book(content.decode("utf-8"), str(path)), stamp, None)
            except (UnicodeDecodeError, PriceBookError) as exc:
                if previous is not None and previous.book is not None:
                    log.error(
                        "meter: price book %r is invalid now; keeping its last valid content: %s", name, exc
                    )
                    loaded = _Loaded(previous.book, stamp, None)
                else:
                    loaded = _Loaded(None, stamp, f"price book {name!r} is invalid: {exc}")
        self._books[name] = loaded
        return loaded

    def book(self, name: str) -> PriceBook | None:
        """The price book ``<name>.yaml`` as loaded (None: it cannot be used)."""
        found = self._books.get(name) or self._load(name)
        return found.book

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        fresh = (
            self._read_at is not None and now - self._read_at < self.settings.plans_refresh.total_seconds()
        )
        if fresh and not force:
            return
        try:
            rows = plan_histories(self.engine)
        except OperationalError as exc:
            log.warning("meter: cannot read account plans (%s); keeping the ones loaded", exc.orig)
            return
        self._read_at = now
        books_before = {name: loaded.stamp for name, loaded in self._books.items()}
        for name in list(self._books):
            self._load(name)
        books_changed = books_before != {name: loaded.stamp for name, loaded in self._books.items()}
        if rows == self._rows and not books_changed:
            return
        self._rows = rows
        self._histories = {account: self._history(history) for account, history in rows.items()}
        self.generation += 1

    def _history(self, rows: list[PlanRow]) -> PlanHistory:
        return PlanHistory.of(
            (epoch_seconds(row.effective_from) if row.effective_from else 0, self._plan(row)) for row in rows
        )

    def _plan(self, row: PlanRow) -> AccountPlan:
        if row.plan is None:
            return self.default
        if row.price_book is None:
            return AccountPlan(None, name=row.plan, unpriced=f"plan {row.plan!r} does not exist")
        loaded = self._books.get(row.price_book) or self._load(row.price_book)
        return AccountPlan(
            loaded.book,
            row.api_tier,
            row.compute_user_type,
            name=row.plan,
            unpriced=loaded.problem,
        )

    def history_of(self, account: str) -> PlanHistory:
        history = self._histories.get(account)
        return history if history is not None else PlanHistory.always(self.default)

    def close(self) -> None:
        self.engine.dispose()
