"""Which plans rate an account over time: Postgres plan histories + price-book files.

The meter reads ``history_of(account)`` once per account whenever ``generation`` changes, so the
answer is a dict lookup; the directory is re-read from Postgres every ``plans_refresh`` (30 s by
default), and a price-book file whose content changed is loaded again.

The read never runs on the event loop: ``refresh`` (each poll) starts it on a thread of its own
and applies it at a later poll once it has finished, and ``load`` (a partition's start) awaits it
for at most ``plans_read_timeout`` (without a bound only until plans have been read once). A
Postgres that hangs (stopped, or a network that drops packets) would otherwise stop the loop, and
with it the heartbeats of every stage's consumer: the worker would lose its partitions after one
session timeout. When Postgres cannot be reached or does not answer, the meter keeps rating with
the plans it has (a stale plan is better than a stalled meter; a plan change takes effect for
usage rated after the next successful read, at the change's own effective time, so usage before
it keeps its old plan).

A plan whose price book cannot be used (its file is gone) prices nothing: the account's usage is
dead-lettered ``unpriced`` with the reason, never rated by another book. A book file edited into
an invalid one keeps its last valid content (logged), so an operator's typo does not stop billing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError

from agents.plans import AccountPlan, PlanHistory, epoch_seconds
from pipeline.settings import Settings
from schemas.pricebook import PriceBook, PriceBookError, parse_price_book
from sinks.postgres import PlanRow, plan_histories, sqlalchemy_url

log = logging.getLogger(__name__)

# How soon a partition's start reads plans again when the first read failed.
_FIRST_READ_RETRY_S = 1.0


def _retrieved(waiting: asyncio.Future[Any]) -> None:
    """Mark a wrapped read's outcome as seen (``_apply`` reads it from the read itself), so asyncio
    does not log a failed read as an exception never retrieved."""
    if not waiting.cancelled():
        waiting.exception()


@dataclass(frozen=True, slots=True)
class _Loaded:
    book: PriceBook | None
    stamp: bytes | None  # a digest of the file's content when read; None: no file
    problem: str | None


class PlanDirectory:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # A connection attempt gives up after the read timeout (libpq's connect_timeout: whole
        # seconds), so a read against an unreachable host ends instead of waiting on TCP.
        self.engine = engine or create_engine(
            sqlalchemy_url(settings),
            pool_size=1,
            max_overflow=0,
            connect_args={"connect_timeout": max(1, int(settings.plans_read_timeout.total_seconds()))},
        )
        self._reading: Future[dict[str, list[PlanRow]]] | None = None
        self._reading_since = 0.0
        self._overdue_logged = False
        self._books: dict[str, _Loaded] = {}
        default = self._load(settings.default_price_book)
        if default.book is None:
            raise PriceBookError([f"{settings.default_price_book}: {default.problem}"])
        self._default_book = default.book
        self.default = AccountPlan(default.book)
        self._histories: dict[str, PlanHistory] = {}
        self._rows: dict[str, list[PlanRow]] = {}
        self.generation = 0
        self._loaded = False  # plans have been read at least once
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

    def refresh(self) -> None:
        """Apply the plans read since the last call, and start the next read when it is due; never
        waits (the meter calls it on the event loop at each poll)."""
        reading = self._reading
        if reading is not None:
            if not reading.done():
                self._log_overdue()
                return
            self._reading = None
            self._apply(reading)
        due = self._read_at is None or (
            time.monotonic() - self._read_at >= self.settings.plans_refresh.total_seconds()
        )
        if due:
            self._start_read()

    async def load(self) -> None:
        """Read the plans now and apply them (a partition's start: its first poll is rated with
        plans as fresh as can be had), waiting at most ``plans_read_timeout`` once plans have been
        read: on a timeout the plans loaded stay, and ``refresh`` applies the read once it ends.
        Until plans have been read once, it waits (off the loop) and retries: with no plans at
        all every account would be rated by the default book, which is no plan but a wrong one."""
        timeout = self.settings.plans_read_timeout.total_seconds()
        finished = self._reading
        if finished is not None and finished.done():  # a read from before: take it, read again
            self._reading = None
            self._apply(finished)
        while True:
            if self._reading is None:
                self._start_read()
            reading = self._reading
            assert reading is not None
            waiting = asyncio.wrap_future(reading)
            waiting.add_done_callback(_retrieved)
            done, _ = await asyncio.wait([waiting], timeout=timeout)  # never cancels the read
            if done and self._reading is reading:  # not taken up by a poll meanwhile
                self._reading = None
                self._apply(reading)
            if self._loaded:
                if not done:
                    self._log_overdue()
                return
            if done:  # the first read failed (logged): try again shortly
                await asyncio.sleep(_FIRST_READ_RETRY_S)

    def read_now(self) -> None:
        """Read the plans and apply them before returning (tests and commands, off any loop)."""
        self._start_read()
        reading = self._reading
        assert reading is not None
        self._reading = None
        wait([reading])
        self._apply(reading)

    def _start_read(self) -> None:
        """Read on a daemon thread: a read hung on a stopped Postgres must not hold the worker's
        exit (an executor's threads are joined at interpreter exit)."""
        reading: Future[dict[str, list[PlanRow]]] = Future()
        engine = self.engine

        def read() -> None:
            try:
                reading.set_result(plan_histories(engine))
            except BaseException as exc:  # handed to whoever applies the read
                reading.set_exception(exc)

        threading.Thread(target=read, name="plan-directory", daemon=True).start()
        self._reading = reading
        self._reading_since = time.monotonic()
        self._overdue_logged = False

    def _log_overdue(self) -> None:
        waited = time.monotonic() - self._reading_since
        if not self._overdue_logged and waited > self.settings.plans_read_timeout.total_seconds():
            self._overdue_logged = True
            log.warning("meter: reading account plans has taken %.0f s; rating with the plans loaded", waited)

    def _apply(self, reading: Future[dict[str, list[PlanRow]]]) -> None:
        """Take a finished read's plans (and reload the books), or keep the ones loaded."""
        self._read_at = self._reading_since  # the next read is due plans_refresh after this one began
        try:
            rows = reading.result()
        except SQLAlchemyError as exc:  # unreachable, refused, or a schema mid-migration
            log.warning("meter: cannot read account plans (%s); keeping the ones loaded", exc)
            return
        self._loaded = True
        books_before = {name: loaded.stamp for name, loaded in self._books.items()}
        for name in list(self._books):
            self._load(name)
        books_changed = books_before != {name: loaded.stamp for name, loaded in self._books.items()}
        if rows == self._rows and not books_changed:
            return
        self._rows = rows
        self._histories = {account: self._history(history) for account, history in rows.items()}
        self.generation += 1
        log.info(
            "meter: plans changed (generation %d): %d accounts with a plan history",
            self.generation,
            len(rows),
        )

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
