"""Ledger: ``charges`` -> Postgres (charges, double-entry entries, balances).

Runs on the exactly-once loop (``agents.transactional``) with no Kafka output: per input
partition and poll, in order,
1. decode the poll's charge batches (a malformed message, or one whose charges break the
   contract in ``schemas.charges``, is dead-lettered, never raised);
2. write every charge, its ledger entries and the balance changes in ONE Postgres transaction,
   idempotent on charge_id (``sinks.postgres.LedgerWriter``): durable from here on;
3. commit the consumed offsets in the Kafka transaction - only after the writes they cause are
   durable (quix-streams' checkpoint order: sinks first, then offsets).
A crash between 2 and 3 replays the poll; step 2 then finds every charge id stored and changes
nothing. Postgres being down is a passing reason (``RetryLaterError``): nothing is committed, the
partition rewinds and is retried, nothing is dropped. Postgres refusing a message's data is not:
that message is dead-lettered and the rest of the poll is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import msgspec
import psycopg
import sqlalchemy.exc
from aiokafka.structs import ConsumerRecord

from agents.config import AgentSettings
from agents.ingest import rejection_message
from agents.transactional import Outcome, RetryLaterError, StatelessTask
from schemas.charges import Charge, charges_decoder
from schemas.rejections import Reason, Rejection, Stage, rejection_counters
from sinks.postgres import LedgerWriter

# The writer uses SQLAlchemy and, for COPY, psycopg directly: errors come from either.
# A passing reason (the server is down or restarting): retry the poll later.
UNAVAILABLE = (sqlalchemy.exc.OperationalError, psycopg.OperationalError)
# Postgres refuses the data itself: retrying cannot help, so the message is dead-lettered.
REFUSED = (
    sqlalchemy.exc.DataError,
    sqlalchemy.exc.IntegrityError,
    psycopg.DataError,
    psycopg.IntegrityError,
)


class LedgerTask(StatelessTask):
    def __init__(self, settings: AgentSettings, partition: int, writer: LedgerWriter) -> None:
        self.writer = writer
        self.rejected_topic = settings.topic_rejected
        self.origin_prefix = f"{settings.topic_charges}/{partition}/"

    async def process(self, records: Sequence[ConsumerRecord[bytes, bytes]], now: datetime) -> Outcome:
        batches: list[tuple[ConsumerRecord[bytes, bytes], list[Charge]]] = []
        rejected: list[Rejection] = []
        for record in records:
            try:
                charges = charges_decoder.decode(record.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                rejected.append(self._reject(record, f"not a charges batch: {exc}"))
                continue
            if any(_fee_outside(c) for c in charges):
                rejected.append(self._reject(record, "a platform fee exceeds its charge"))
                continue
            batches.append((record, charges))
        try:
            # In a thread: a poll can bring tens of thousands of charges (seconds of Postgres
            # work), and the event loop must keep every stage's consumer heartbeating meanwhile.
            new = await self._write([c for _, charges in batches for c in charges])
        except REFUSED:
            # Postgres refused something in the poll (a NUL in a text, say): write message by
            # message, dead-letter the ones it refuses; the writer is idempotent, so what the
            # failed attempt rolled back and what is written again come out the same.
            new = 0
            for record, charges in batches:
                try:
                    new += await self._write(charges)
                except REFUSED as exc:
                    rejected.append(self._reject(record, f"Postgres refused it: {exc}"[:1000]))
        messages = [rejection_message(self.rejected_topic, r) for r in rejected]
        charged = sum(len(charges) for _, charges in batches)
        return Outcome(messages, counters={"charges": charged, "new": new, **rejection_counters(rejected)})

    async def _write(self, charges: list[Charge]) -> int:
        try:
            return await asyncio.to_thread(self.writer.write, charges)
        except UNAVAILABLE as exc:
            raise RetryLaterError(f"Postgres unavailable: {str(exc).strip()[:300]}") from exc

    def _reject(self, record: ConsumerRecord[bytes, bytes], detail: str) -> Rejection:
        return Rejection(
            reason=Reason.SCHEMA_VIOLATION,
            detail=detail,
            original=record.value or b"",
            origin=f"{self.origin_prefix}{record.offset}",
            stage=Stage.LEDGER,
        )


class LedgerStage:
    name = "ledger"

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.input_topic = settings.topic_charges
        self.writer = LedgerWriter(settings)  # one connection pool for all partitions

    async def open_task(self, partition: int) -> LedgerTask:
        return LedgerTask(self.settings, partition, self.writer)


def _fee_outside(charge: Charge) -> bool:
    """The platform fee is a share of its charge: of its sign (a credit's fee is credited too), and
    no larger."""
    fee, amount = charge.platform_fee_base_units, charge.amount_base_units
    return abs(fee) > abs(amount) or fee * amount < 0
