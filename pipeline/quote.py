"""Quotes: usage rated by the meter's own code, without Kafka or a database (``tally quote``).

A quote runs the very steps a worker runs on one partition (``agents.meter.MeterTask``: ingest's
contract, dedupe, windows, GPU and compute sessions, period-exact rating) over an in-memory store,
then closes every window and ends every session, so its charges are what the pipeline would
charge for the same events, to the base unit.

Input: one JSON line per event, a CloudEvent as producers send it (``specversion``, ``id`` and
``source`` may be left out: a quote fills them in), plus, optionally, ``plan``: the plan the
subject is on from that event's time on (a plan name, or an object with ``api_tier`` and
``compute_user_type``; a subject's earliest plan holds since ever). A line of only ``subject``,
``time`` and ``plan`` changes the plan without an event. A plan name is read in the price book:
an API tier of that name, and the compute user type of that name, where the book has them. The
quote's clock is its latest event time: older events meet the correction horizon as a worker's
would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from agents.ingest import ingest_core
from agents.meter import MeterTask
from agents.plans import AccountPlan, FixedPlans, PlanHistory, epoch_seconds
from pipeline.settings import Settings
from schemas.charges import Charge, charges_decoder
from schemas.pricebook import PriceBook
from sinks.statestore import MemoryStore

_line_decoder = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class QuoteError:
    line: int
    reason: str
    detail: str


@dataclass
class Quote:
    charges: list[Charge] = field(default_factory=list)
    errors: list[QuoteError] = field(default_factory=list)
    events: int = 0


def plan_named(book: PriceBook, plan: str | dict[str, Any]) -> AccountPlan:
    """A quote line's ``plan``: a name (an API tier and/or compute user type of that name in the
    book) or ``{"api_tier": ..., "compute_user_type": ...}``."""
    if isinstance(plan, dict):
        unknown = set(plan) - {"api_tier", "compute_user_type"}
        if unknown:
            raise ValueError(f"plan: unknown fields {sorted(unknown)}")
        return AccountPlan(book, plan.get("api_tier"), plan.get("compute_user_type"))
    tiers = {name for v in book.versions for name in v.api_tiers}
    user_types = {name for v in book.versions for name in v.compute_per_hour}
    if plan not in tiers | user_types:
        raise ValueError(f"plan: {plan!r} is neither an API tier nor a compute user type of {book.name!r}")
    return AccountPlan(book, plan if plan in tiers else None, plan if plan in user_types else None, name=plan)


def quote(
    lines: Iterable[bytes], book: PriceBook, settings: Settings, default_plan: str | None = None
) -> Quote:
    """Rate the events ``lines`` hold, as one worker partition would; every window closed."""
    settings = settings.model_copy(update={"partitions": 1, "accounts_file": None})
    result = Quote()
    default = plan_named(book, default_plan) if default_plan else AccountPlan(book)
    plans = FixedPlans(default)
    changes: dict[str, list[tuple[int, AccountPlan]]] = {}
    values: list[tuple[int, bytes]] = []
    latest: datetime | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        line = _Line.read(raw, number)
        if line.plan is not None:
            if line.subject is None or line.time is None:
                result.errors.append(
                    QuoteError(number, "schema_violation", "plan: the line needs a subject and a time")
                )
                continue
            try:
                plan = plan_named(book, line.plan)
            except ValueError as exc:
                result.errors.append(QuoteError(number, "schema_violation", str(exc)))
                continue
            changes.setdefault(line.subject, []).append((epoch_seconds(line.time), plan))
        if line.plan_only:
            continue
        if line.time is not None and (latest is None or line.time > latest):
            latest = line.time
        values.append((number, line.value))
    for subject, history in changes.items():
        # A subject's earliest plan holds since ever (as an account's plan in Postgres does); each
        # later one from its line's time.
        plans.set(subject, PlanHistory.of(history))
    now = latest or datetime.now(UTC)
    task = MeterTask(settings, 0, MemoryStore(), plans, ingest_core(settings))
    records = [
        ConsumerRecord(settings.topic_raw, 0, number, 0, 0, None, value, None, 0, len(value), [])
        for number, value in values
    ]
    outcome = task.process(records, now)
    _commit(task, settings, outcome)
    result.events = outcome.counters.get("accepted", 0)
    end = now + settings.window_size + settings.window_grace + settings.session_idle_timeout
    closed = task.windows.close(now, wall_clock=int(end.timestamp()) + 1)
    for message in outcome.messages:
        if message.topic == settings.topic_charges:
            result.charges.extend(charges_decoder.decode(message.value))
        elif message.topic == settings.topic_rejected:
            headers = dict(message.headers)
            origin = headers["tally.origin"].decode()
            number = (
                int(origin.rsplit("/", 1)[-1].split("#")[0]) if origin.startswith(settings.topic_raw) else 0
            )
            result.errors.append(
                QuoteError(number, headers["tally.reason"].decode(), headers["tally.detail"].decode())
            )
    result.charges.extend(closed.charges)
    result.errors.extend(QuoteError(0, r.reason.value, r.detail) for r in closed.rejected)
    return result


@dataclass(frozen=True, slots=True)
class _Line:
    """A quote line: the event as a producer would send it, and the plan it puts its subject on."""

    value: bytes
    plan: str | dict[str, Any] | None = None
    subject: str | None = None
    time: datetime | None = None
    plan_only: bool = False  # no event: the subject's plan changes at ``time``

    @classmethod
    def read(cls, raw: bytes, number: int) -> _Line:
        try:
            event = _line_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return cls(raw)  # not a JSON object: ingest says why
        event.setdefault("specversion", "1.0")
        event.setdefault("id", f"quote-{number}")
        event.setdefault("source", "tally-quote")
        plan = event.pop("plan", None)
        subject = event.get("subject")
        return cls(
            msgspec.json.encode(event),
            plan if isinstance(plan, str | dict) else None,
            subject if isinstance(subject, str) else None,
            _time(event.get("time")),
            plan_only=plan is not None and "type" not in event and "data" not in event,
        )


def _time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo is not None else None


def _commit(task: MeterTask, settings: Settings, outcome: Any) -> None:
    """What the exactly-once loop does after the transaction: the store takes the changes."""
    tp = TopicPartition(settings.topic_raw, 0)
    metadata = [
        RecordMetadata(m.topic, 0, tp, offset, 0, 0, 0) for offset, m in enumerate(outcome.messages, start=1)
    ]
    task.committed(outcome, metadata)
