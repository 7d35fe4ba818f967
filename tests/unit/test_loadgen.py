"""The load generator's expectations are exact, cover every reason, and agree with the ingest core."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from pipeline.loadgen import Expected, LoadPlan, account_ids, generate
from schemas.rejections import Reason, reason_of
from tests.unit.meter_in_memory import MeterRun

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def pipeline_in_memory(plan: LoadPlan, tmp_path: Path) -> tuple[Expected, int, Counter[str], int]:
    """The meter's task (ingest, dedupe, windows; native and Python paths) run in-process over the
    generated messages (no Kafka), a poll per 500 messages."""
    expected = Expected()
    messages = list(generate(plan, NOW, expected))
    accounts = tmp_path / "accounts.txt"
    accounts.write_text("\n".join(account_ids(plan.accounts)) + "\n", encoding="utf-8")
    meter = MeterRun(
        tmp_path,
        max_event_bytes=plan.max_event_bytes,
        max_message_bytes=plan.max_message_bytes,
        accounts_file=accounts,
    )
    for start in range(0, len(messages), 500):
        meter.poll([m.value for m in messages[start : start + 500]], NOW)
    rejected = Counter(reason_of(m.headers) or "none" for m in meter.sent(meter.settings.topic_rejected))
    accepted = sum(o.counters["accepted"] for o in meter.outcomes)
    assert accepted == len(meter.accepted())
    return expected, accepted, rejected, sum(o.counters["duplicates"] for o in meter.outcomes)


def test_single_event_plan_matches_the_pipeline_exactly(tmp_path: Path) -> None:
    plan = LoadPlan(
        events=4_000, accounts=20, seed=3, run_id="t1", max_event_bytes=10_000, max_message_bytes=100_000
    )
    expected, accepted, rejected, duplicates = pipeline_in_memory(plan, tmp_path)
    assert accepted == len(expected.accepted)
    assert rejected == expected.rejected
    assert duplicates == expected.duplicates
    assert set(expected.rejected) == {r.value for r in Reason}, "every reason code at least once"
    assert expected.duplicates > 0.03 * plan.events


def test_batch_plan_matches_the_pipeline_exactly(tmp_path: Path) -> None:
    plan = LoadPlan(
        events=4_000,
        accounts=20,
        batch_size=50,
        seed=4,
        run_id="t2",
        max_event_bytes=10_000,
        max_message_bytes=100_000,
    )
    expected, accepted, rejected, duplicates = pipeline_in_memory(plan, tmp_path)
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
