"""The meter's real task (``agents.meter.MeterTask``: native core + Python ingest + windows) over
in-memory state, committed as the exactly-once loop commits it: for unit tests without Kafka."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from agents.ingest import ingest_core
from agents.meter import MeterTask
from agents.plans import AccountPlan, FixedPlans, PlanHistory
from agents.transactional import Outcome, Outgoing
from pipeline.settings import REPO_ROOT, Settings, load_settings
from schemas.charges import Charge, charges_decoder
from schemas.events import batch_splitter
from schemas.pricebook import load_price_book
from sinks.statestore import MemoryStore

BOOK = load_price_book(REPO_ROOT / "schemas" / "pricebooks" / "default.yaml")


class MeterRun:
    """One partition's meter task; ``poll`` processes messages and commits the outcome."""

    def __init__(
        self,
        data_dir: Path,
        partition: int = 0,
        plans: dict[str, PlanHistory] | None = None,
        store: MemoryStore | None = None,
        default: AccountPlan | None = None,
        **settings: Any,
    ) -> None:
        self.settings: Settings = load_settings(data_dir=data_dir, **{"partitions": 1, **settings})
        self.partition = partition
        self.store = store or MemoryStore()
        self.plans = FixedPlans(default or AccountPlan(BOOK), plans or {})
        self.offset = 0
        self.changelog_offset = 0
        self.outcomes: list[Outcome] = []
        self.task = self.reopen()

    def reopen(self) -> MeterTask:
        """The task a restarted worker opens on the committed store."""
        self.task = MeterTask(
            self.settings, self.partition, self.store, self.plans, ingest_core(self.settings)
        )
        return self.task

    def poll(self, values: Sequence[bytes | None], now: datetime) -> Outcome:
        records = []
        for value in values:
            records.append(
                ConsumerRecord(
                    self.settings.topic_raw, self.partition, self.offset, 0, 0, None, value, None, 0, 0, []
                )
            )
            self.offset += 1
        outcome = self.task.process(records, now)
        self.commit(outcome)
        return outcome

    def commit(self, outcome: Outcome) -> None:
        """What the loop does after the transaction: the metadata of every message sent."""
        tp = TopicPartition(self.settings.topic_raw, self.partition)
        metadata = []
        for message in outcome.messages:
            self.changelog_offset += 1
            metadata.append(RecordMetadata(message.topic, self.partition, tp, self.changelog_offset, 0, 0, 0))
        self.task.committed(outcome, metadata)
        self.outcomes.append(outcome)

    def finish(self, now: datetime, wall_clock: datetime) -> list[Charge]:
        """Close every window and end every session by the wall clock, as an idle partition's
        tick does, and commit; return the charges made."""
        closed = self.task.windows.close(now, wall_clock=int(wall_clock.timestamp()))
        self.changelog_offset += 1
        self.store.apply(closed.changes.items(), self.changelog_offset)
        return closed.charges

    def charges(self) -> list[Charge]:
        """Every charge the polls sent to the charges topic."""
        return [c for m in self.sent(self.settings.topic_charges) for c in charges_decoder.decode(m.value)]

    def sent(self, topic: str, outcome: Outcome | None = None) -> list[Outgoing]:
        outcomes = [outcome] if outcome is not None else self.outcomes
        return [m for o in outcomes for m in o.messages if m.topic == topic]

    def accepted(self, outcome: Outcome | None = None) -> list[bytes]:
        """Every accepted event (normalized), in order."""
        return [
            bytes(raw)
            for m in self.sent(self.settings.topic_accepted, outcome)
            for raw in batch_splitter.decode(m.value)
        ]
