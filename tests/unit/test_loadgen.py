"""The load generator's expectations are exact, cover every reason, and agree with the ingest core."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from agents.dedupe import DedupeResult, dedupe_records
from agents.ingest import IngestCore, IngestPolicy, Partitioner
from agents.window import AccountPlan, UnpricedError, WindowConfig, Windows
from pipeline.loadgen import Expected, LoadPlan, account_ids, generate
from pipeline.settings import REPO_ROOT
from schemas.pricebook import load_price_book
from schemas.rejections import Reason

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
BOOK = load_price_book(REPO_ROOT / "schemas" / "pricebooks" / "default.yaml")


def pipeline_in_memory(plan: LoadPlan) -> tuple[Expected, int, Counter[str], int]:
    """Ingest, dedupe and windows, run in-process over the generated messages (no Kafka)."""
    expected = Expected()
    messages = list(generate(plan, NOW, expected))
    policy = IngestPolicy(
        plan.max_message_bytes,
        plan.max_event_bytes,
        timedelta(minutes=5),
        timedelta(days=35),
        frozenset(account_ids(plan.accounts)),
    )
    core = IngestCore(policy, Partitioner(3))
    ingested = core.new_result(NOW)
    for offset, message in enumerate(messages):
        core.process(message.value, f"raw/0/{offset}", ingested)
    rejected = Counter(r.reason.value for r in ingested.rejected)
    deduped = DedupeResult()
    committed: dict[bytes, bytes] = {}
    for _, events in ingested.accepted.messages():
        dedupe_records(events, ["raw/0/0"] * len(events), committed.get, deduped)
    rejected.update(r.reason.value for r in deduped.rejected)
    nothing_stored: dict[bytes, bytes] = {}
    windows = Windows(WindowConfig(), lambda _: AccountPlan(BOOK), nothing_stored.get, {}, 0)
    accepted = 0
    for _, _, _, event in deduped.accepted:
        try:
            windows.add(event)
            accepted += 1
        except UnpricedError:
            rejected[Reason.UNPRICED.value] += 1
    return expected, accepted, rejected, deduped.duplicates


def test_single_event_plan_matches_the_pipeline_exactly() -> None:
    plan = LoadPlan(
        events=4_000, accounts=20, seed=3, run_id="t1", max_event_bytes=10_000, max_message_bytes=100_000
    )
    expected, accepted, rejected, duplicates = pipeline_in_memory(plan)
    assert accepted == len(expected.accepted)
    assert rejected == expected.rejected
    assert duplicates == expected.duplicates
    assert set(expected.rejected) == {r.value for r in Reason}, "every reason code at least once"
    assert expected.duplicates > 0.03 * plan.events


def test_batch_plan_matches_the_pipeline_exactly() -> None:
    plan = LoadPlan(
        events=4_000,
        accounts=20,
        batch_size=50,
        seed=4,
        run_id="t2",
        max_event_bytes=10_000,
        max_message_bytes=100_000,
    )
    expected, accepted, rejected, duplicates = pipeline_in_memory(plan)
    assert (accepted, rejected, duplicates) == (
        len(expected.accepted),
        expected.rejected,
        expected.duplicates,
    )
    assert expected.messages < plan.events / 10


def test_same_seed_same_messages() -> None:
    plan = LoadPlan(events=500, seed=9, run_id="same")
    first = [m.value for m in generate(plan, NOW, Expected())]
    second = [m.value for m in generate(plan, NOW, Expected())]
    assert first == second
