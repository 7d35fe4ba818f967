"""Price books chosen per account plan, from Postgres plans and book files (real Postgres)."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import create_engine

from pipeline.plans import PlanDirectory
from pipeline.settings import REPO_ROOT, load_settings
from pipeline.testing import isolated_database
from sinks.postgres import sqlalchemy_url, upsert_accounts, upsert_plans

PREMIUM = """
name: premium
versions:
  - effective_from: "2026-01-01T00:00:00Z"
    gpu: {base_rate_per_hour: {h100: "6.00"}}
    api_tiers:
      gold: {monthly_fee: "500", included_requests: 1000000, overage_per_request: "0.001"}
"""


def test_each_account_is_rated_with_its_plans_book_and_tier(tmp_path: Path) -> None:
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
        plans.refresh(force=True)
        gold, start, none, unknown = (
            plans.plan_of(a) for a in ("acct-gold", "acct-start", "acct-none", "acct-unknown")
        )
        assert (gold.book.name, gold.api_tier) == ("premium", "gold")
        assert (start.book.name, start.api_tier) == ("default", "startup")
        # No plan, or not in Postgres at all: the default book, no API tier.
        assert (none.book.name, none.api_tier) == (unknown.book.name, unknown.api_tier) == ("default", None)

        # A plan change reaches the meter at the next refresh.
        upsert_accounts(engine, [("acct-start", "gold")])
        assert plans.plan_of("acct-start").book.name == "default"  # not refreshed yet (30 s)
        plans.refresh(force=True)
        assert plans.plan_of("acct-start").book.name == "premium"
    finally:
        engine.dispose()
