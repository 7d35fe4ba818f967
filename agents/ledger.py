"""Ledger: ``charges`` -> Postgres (charges, double-entry entries, balances).

Runs on the exactly-once loop (``pipeline.transactional``) with no Kafka output: per input
partition and poll, in order,
1. decode the poll's charge batches (a malformed message is dead-lettered, never raised);
2. write every charge, its ledger entries and the balance changes in ONE Postgres transaction,
   idempotent on charge_id (``sinks.postgres.LedgerWriter``): durable from here on;
3. commit the consumed offsets in the Kafka transaction - only after the writes they cause are
   durable (quix-streams' checkpoint order: sinks first, then offsets).
A crash between 2 and 3 replays the poll; step 2 then finds every charge id stored and changes
nothing. Postgres being down is a passing reason (``RetryLaterError``): nothing is committed, the
partition rewinds and is retried, nothing is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import msgspec
from aiokafka.structs import ConsumerRecord, RecordMetadata
from sqlalchemy.exc import OperationalError

from agents.ingest import rejection_message
from pipeline.settings import Settings
from pipeline.transactional import Outcome, RetryLaterError
from schemas.charges import Charge, charges_decoder
from schemas.rejections import Reason, Rejection, Stage, rejection_counters
from sinks.postgres import LedgerWriter


class LedgerTask:
    def __init__(self, settings: Settings, partition: int, writer: LedgerWriter) -> None:
        self.writer = writer
        self.rejected_topic = settings.topic_rejected
        self.origin_prefix = f"{settings.topic_charges}/{partition}/"

    async def process(self, records: Sequence[ConsumerRecord[bytes, bytes]], now: datetime) -> Outcome:
        charges: list[Charge] = []
        rejected: list[Rejection] = []
        for record in records:
            try:
                charges.extend(charges_decoder.decode(record.value or b""))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                origin = f"{self.origin_prefix}{record.offset}"
                rejected.append(
                    Rejection(
                        reason=Reason.SCHEMA_VIOLATION,
                        detail=f"not a charges batch: {exc}",
                        original=record.value or b"",
                        origin=origin,
                        stage=Stage.LEDGER,
                    )
                )
        try:
            # In a thread: a poll can bring tens of thousands of charges (seconds of Postgres
            # work), and the event loop must keep every stage's consumer heartbeating meanwhile.
            new = await asyncio.to_thread(self.writer.write, charges)
        except OperationalError as exc:
            raise RetryLaterError(f"Postgres unavailable: {str(exc.orig).strip()[:300]}") from exc
        messages = [rejection_message(self.rejected_topic, r) for r in rejected]
        return Outcome(
            messages, counters={"charges": len(charges), "new": new, **rejection_counters(rejected)}
        )

    def committed(self, outcome: Outcome, metadata: Sequence[RecordMetadata]) -> None:
        return None

    def tick(self, now: datetime) -> Outcome | None:
        return None

    def close(self) -> None:
        return None


class LedgerStage:
    name = "ledger"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.input_topic = settings.topic_charges
        self.writer = LedgerWriter(settings)  # one connection pool for all partitions

    async def open_task(self, partition: int) -> LedgerTask:
        return LedgerTask(self.settings, partition, self.writer)
