"""Plan histories from Postgres and price books from files (real Postgres): each account rated by
the plan in force at each moment, books reloaded when their file changes, a missing book unpriced."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agents.plans import epoch_seconds
from pipeline.plans import PlanDirectory
from pipeline.settings import REPO_ROOT, load_settings
from pipeline.testing import isolated_database, settings_env
from sinks.postgres import change_plan, sqlalchemy_url, upsert_accounts, upsert_plans

PREMIUM = """
name: premium
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu: {base_rate_per_hour: {h100: "6.00"}}
    api_tiers:
      gold: {monthly_fee: "500", included_requests: 1000000, overage_per_request: "0.001"}
"""
NOON = datetime(2026, 11, 24, 12, tzinfo=UTC)
TALLY = str(Path(sys.executable).with_name("tally"))


def test_each_account_is_rated_by_the_plan_in_force_at_each_moment(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    shutil.copy(REPO_ROOT / "schemas" / "pricebooks" / "default.yaml", books / "default.yaml")
    (books / "premium.yaml").write_text(PREMIUM, encoding="utf-8")
    settings = isolated_database(load_settings(data_dir=tmp_path, price_books_dir=books))
    engine = create_engine(sqlalchemy_url(settings))
    try:
        upsert_plans(
            engine,
            [
                {"name": "gold", "price_book": "premium", "api_tier": "gold"},
                {"name": "startup", "price_book": "default", "api_tier": "startup"},
            ],
        )
        upsert_accounts(engine, [("acct-gold", "gold"), ("acct-start", "startup"), ("acct-none", None)])
        plans = PlanDirectory(settings, engine)
        plans.read_now()
        at = epoch_seconds(NOON)
        gold, start, none, unknown = (
            plans.history_of(a).at(at) for a in ("acct-gold", "acct-start", "acct-none", "acct-unknown")
        )
        assert gold.book is not None and (gold.book.name, gold.api_tier) == ("premium", "gold")
        assert start.book is not None and (start.book.name, start.api_tier) == ("default", "startup")
        # No plan, or not in Postgres at all: the default book, no API tier.
        assert none == unknown == plans.default

        # A plan change from noon on: the history has both, each from its time; the meter
        # sees it (a new generation) at the next refresh.
        generation = plans.generation
        change_plan(engine, "acct-start", "gold", NOON, actor="test")
        assert plans.history_of("acct-start").at(at).api_tier == "startup"  # not refreshed yet
        plans.read_now()
        assert plans.generation == generation + 1
        history = plans.history_of("acct-start")
        assert history.at(at - 1).api_tier == "startup" and history.at(at).api_tier == "gold"
        plans.read_now()
        assert plans.generation == generation + 1  # nothing changed: the meter keeps its plans
        with engine.connect() as db:
            audit = db.execute(text("SELECT actor, action, subject FROM audit_log")).one()
        assert tuple(audit) == ("test", "plan_change", "acct-start")
        with pytest.raises(Exception, match="effective_from"):
            change_plan(engine, "acct-start", "gold", NOON.replace(microsecond=5), actor="test")
    finally:
        engine.dispose()


def test_a_changed_book_is_reloaded_and_a_removed_one_prices_nothing(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    shutil.copy(REPO_ROOT / "schemas" / "pricebooks" / "default.yaml", books / "default.yaml")
    premium = books / "premium.yaml"
    premium.write_text(PREMIUM, encoding="utf-8")
    settings = isolated_database(load_settings(data_dir=tmp_path, price_books_dir=books))
    engine = create_engine(sqlalchemy_url(settings))
    try:
        upsert_plans(engine, [{"name": "gold", "price_book": "premium", "api_tier": "gold"}])
        upsert_accounts(engine, [("acct-gold", "gold")])
        plans = PlanDirectory(settings, engine)
        plans.read_now()
        plan = plans.history_of("acct-gold").at(0)
        assert plan.book is not None and plan.book.versions[0].gpu is not None

        premium.write_text(PREMIUM.replace('"6.00"', '"7.00"'), encoding="utf-8")
        plans.read_now()
        plan = plans.history_of("acct-gold").at(0)
        assert plan.book is not None and plan.book.versions[0].gpu is not None
        assert plan.book.versions[0].gpu.base_rate_per_hour["h100"] == 7

        premium.write_text("name: premium\nversions: []\n", encoding="utf-8")  # an operator's typo
        plans.read_now()
        plan = plans.history_of("acct-gold").at(0)
        assert plan.book is not None and plan.book.versions[0].gpu is not None  # the last valid one

        premium.unlink()
        plans.read_now()
        plan = plans.history_of("acct-gold").at(0)
        assert plan.book is None and plan.unpriced is not None and "premium" in plan.unpriced
    finally:
        engine.dispose()


def test_tally_plans_changes_a_plan_from_a_moment_and_shows_the_history(tmp_path: Path) -> None:
    settings = isolated_database(load_settings(data_dir=tmp_path))
    engine = create_engine(sqlalchemy_url(settings))
    upsert_plans(engine, [{"name": "startup", "price_book": "default", "api_tier": "startup"}])
    upsert_accounts(engine, [("acct-1", None)])
    env = settings_env(settings)

    def tally(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TALLY, "plans", *args], capture_output=True, text=True, env=env, check=False)

    try:
        assert tally("change", "acct-1", "startup", "--from", "2026-11-24T12:00:00+01:00").returncode == 0
        bad_time = tally("change", "acct-1", "startup", "--from", "2026-11-24T12:00:00")
        unknown = tally("change", "acct-1", "platinum")
        shown = tally("show", "acct-1", "--json")
    finally:
        engine.dispose()
    assert bad_time.returncode == 2 and "--from" in bad_time.stderr and "offset" in bad_time.stderr
    assert unknown.returncode == 2 and "PLAN" in unknown.stderr and "platinum" in unknown.stderr
    history = json.loads(shown.stdout)["history"]
    assert [(h["from"], h["plan"], h["api_tier"]) for h in history] == [
        (None, None, None),
        ("2026-11-24T11:00:00+00:00", "startup", "startup"),
    ]


def test_plans_are_read_off_the_loop_and_kept_when_postgres_cannot_answer(tmp_path: Path) -> None:
    """A failed read keeps the plans loaded; a partition's start (``load``) waits for plans until
    they have been read once. (That no read holds the event loop: tests/integration/
    test_postgres_pause.py.)"""
    settings = isolated_database(
        load_settings(data_dir=tmp_path, plans_refresh="PT0S", plans_read_timeout="PT1S")
    )
    engine = create_engine(sqlalchemy_url(settings))
    # Nothing listens on port 9 (discard) here: every connection is refused at once.
    unreachable = create_engine("postgresql+psycopg://tally@127.0.0.1:9/tally", pool_size=1, max_overflow=0)
    try:
        upsert_plans(engine, [{"name": "startup", "price_book": "default", "api_tier": "startup"}])
        upsert_accounts(engine, [("acct-1", "startup")])

        never_read = PlanDirectory(settings, unreachable)
        with pytest.raises(TimeoutError):  # no plans yet: the start waits, retrying
            asyncio.run(asyncio.wait_for(never_read.load(), 3))
        assert never_read.generation == 0

        plans = PlanDirectory(settings, engine)
        asyncio.run(plans.load())
        assert plans.history_of("acct-1").at(0).api_tier == "startup"
        generation = plans.generation
        plans.engine = unreachable  # Postgres goes away
        plans.refresh()  # starts a read on the directory's thread
        asyncio.run(plans.load())  # the read fails (logged): the plans loaded stay
        plans.refresh()
        assert plans.generation == generation
        assert plans.history_of("acct-1").at(0).api_tier == "startup"
        never_read.close()
        plans.close()
    finally:
        engine.dispose()
        unreachable.dispose()
