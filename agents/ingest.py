"""Ingest: the meter stage's first step, raw usage -> validated, routed events | rejections.

``IngestCore`` is a pure core (no I/O, no clock reads: the caller passes ``now``). The meter stage
(``agents.meter``) runs it on each poll of a ``usage.raw`` partition: it meters the events routed
to that same partition and forwards the others to their account's partition of ``usage.raw``.

Per event, in order:
1. size: a message above ``max_message_bytes`` or an event above ``max_event_bytes`` -> ``oversized``;
2. split: a JSON array is a CloudEvents batch, split into raw elements without decoding them
   (a message that is not JSON at all -> ``malformed_json``, the whole message);
3. decode + validate in one msgspec pass into the type's struct (``unknown_type``,
   ``negative_quantity`` for counts below zero, ``schema_violation`` for the rest);
4. checks msgspec cannot express: decimal quantities non-negative, at most 10^15 and of at most
   28 significant digits (the precision money is computed in, so every quantity enters it
   exactly; a float's 17 digits pass), VRAM allocated within total, utilization within 0..1,
   event time within [now - horizon, now + tolerance], subject a known account when an account
   list is configured;
5. normalize: time to UTC, decimals as strings, canonical field order (one encoding per event,
   so equal payloads are equal bytes), then route by ``murmur2(subject)`` - Kafka's default
   partitioner, the one producers key ``usage.raw`` with - to the partition whose meter owns the
   account, as a record [identity, fingerprint, event] (``schemas.events.ValidRecord``).

A bad event in a batch rejects only that event. Nothing here raises on input.

The meter runs this core only on the messages its compiled fast path declines
(``tally_native.MeterCore``: the same rules over the forms Tally's own producer writes, held to
this module's output by tests/unit/test_native_ingest.py), so this module is the one place that
says why an event is rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import repeat

import msgspec
import xxhash
from aiokafka.partitioner import murmur2

from agents.config import AgentSettings
from agents.transactional import Outgoing
from schemas.events import (
    GpuUsageEvent,
    SessionStartedEvent,
    StorageUsageEvent,
    UsageEvent,
    ValidRecord,
    batch_event_decoder,
    batch_splitter,
    encoder,
    event_decoder,
)
from schemas.rejections import Reason, Rejection, Stage

log = logging.getLogger(__name__)

# Largest decimal quantity accepted in one event (10^15 GB or W is a producer bug, not usage), and
# its most significant digits: money is computed at 28 (Python's decimal context, and the meter's
# native core, which reads a quantity exactly only up to 36).
MAX_QUANTITY = Decimal(10) ** 15
MAX_DIGITS = 28
_ZERO = Decimal(0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Partition numbers cached per account; cleared when it grows past this (bounded memory).
PARTITION_CACHE_SIZE = 1_000_000

_WHITESPACE = b" \t\r\n"
_WHITESPACE_BYTES = frozenset({b" ", b"\t", b"\r", b"\n"})


@dataclass(frozen=True, slots=True)
class IngestPolicy:
    max_message_bytes: int
    max_event_bytes: int
    future_tolerance: timedelta
    horizon: timedelta
    known_accounts: frozenset[str] | None = None


@dataclass(slots=True)
class PartitionedBatches:
    """Accepted events per destination partition, in order (the native core cuts them into
    messages: native/src/outputs.rs)."""

    partitions: int
    # partition -> (records, the origin of each: its Kafka record)
    _records: dict[int, tuple[list[ValidRecord], list[str]]] = field(default_factory=dict)
    count: int = 0

    def add(self, events: Sequence[UsageEvent], partition_of: Partitioner, origin: str) -> None:
        """Add validated events: time to UTC, one canonical encoding each, routed by subject, as
        the records dedupe reads: (identity, fingerprint, normalized JSON, the event). One loop
        with everything bound to locals: a method call per event cost ~0.3 us more here."""
        records = self._records
        cached_partition = partition_of.cache.get
        encode = encoder.encode
        digest = xxhash.xxh3_128_digest
        for event in events:
            if event.time.tzinfo is not UTC:  # msgspec gives "Z" and "+00:00" this very tzinfo
                event.time = event.time.astimezone(UTC)
            body = encode(event)
            key = f"{event.source}\x00{event.id}".encode()  # identity_key, inlined
            partition = cached_partition(event.subject)
            if partition is None:
                partition = partition_of(event.subject)
            pending = records.get(partition)
            if pending is None:
                pending = records[partition] = ([], [])
            pending[0].append((key, digest(body), body, event))  # digest: schemas.events.fingerprint
            pending[1].append(origin)
        self.count += len(events)

    def drain(self) -> Iterator[tuple[int, list[ValidRecord]]]:
        """Remove and yield every partition's records, partition by partition."""
        records, self._records = self._records, {}
        for partition, (batch, _) in records.items():
            yield partition, batch


class Partitioner:
    """Kafka's default partitioner (murmur2 of the key), cached per account."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.cache: dict[str, int] = {}

    def __call__(self, account: str) -> int:
        partition = self.cache.get(account)
        if partition is None:
            partition = (murmur2(account.encode()) & 0x7FFFFFFF) % self.partitions
            if len(self.cache) >= PARTITION_CACHE_SIZE:
                self.cache.clear()
            self.cache[account] = partition
        return partition


@dataclass(frozen=True, slots=True)
class _TimeBounds:
    """The accepted event-time range, computed once per poll rather than once per event."""

    now: datetime
    earliest: datetime
    latest: datetime


@dataclass(slots=True)
class IngestResult:
    accepted: PartitionedBatches
    bounds: _TimeBounds
    rejected: list[Rejection] = field(default_factory=list)


class IngestCore:
    """Validates and routes events. One instance per worker; ``process`` is called per record."""

    def __init__(self, policy: IngestPolicy, partitioner: Partitioner) -> None:
        self.policy = policy
        self.partitioner = partitioner

    def bounds(self, now: datetime) -> _TimeBounds:
        """The event times accepted at ``now``."""
        return _TimeBounds(now, now - self.policy.horizon, now + self.policy.future_tolerance)

    def new_result(self, now: datetime) -> IngestResult:
        """An empty result for one poll; event times are judged against ``now``."""
        return IngestResult(PartitionedBatches(self.partitioner.partitions), self.bounds(now))

    def process(self, value: bytes | None, origin: str, result: IngestResult) -> None:
        """Validate one Kafka record's value (one event or a batch) into ``result``."""
        policy = self.policy
        if (
            value
            and value[:1] == b"["
            and len(value) <= policy.max_event_bytes
            and self._whole_batch(value, origin, result)
        ):
            return
        split = _split(value, origin, policy.max_message_bytes, result)
        if split is None:
            return
        elements, batch = split
        # The per-event loop, with everything it touches bound to locals (~0.5 us per event saved
        # against a method call per event and attribute lookups, measured here).
        max_event_bytes = policy.max_event_bytes
        bounds = result.bounds
        rejected = result.rejected
        decode = event_decoder.decode
        add = result.accepted.add
        partition_of = self.partitioner
        for index, raw in enumerate(elements):
            where = index if batch else None
            try:
                if len(raw) > max_event_bytes:
                    detail = f"event of {len(raw)} bytes exceeds {max_event_bytes}"
                    rejected.append(_reject(Reason.OVERSIZED, detail, raw, origin, where))
                    continue
                try:
                    event = decode(raw)
                except msgspec.ValidationError as exc:
                    rejected.append(_reject(_classify(str(exc)), str(exc), raw, origin, where))
                    continue
                except msgspec.DecodeError as exc:
                    rejected.append(_reject(Reason.MALFORMED_JSON, str(exc), raw, origin, where))
                    continue
                problem = _check(event, policy, bounds)
                if problem is not None:
                    rejected.append(_reject(problem[0], problem[1], raw, origin, where))
                    continue
                add((event,), partition_of, origin)
            except Exception as exc:  # last line of defence: a poison event must not crash-loop the worker
                log.exception("ingest: unexpected error on %s#%s; dead-lettered", origin, where)
                detail = f"could not be processed: {exc!r}"
                rejected.append(_reject(Reason.SCHEMA_VIOLATION, detail, raw, origin, where))

    def _whole_batch(self, value: bytes, origin: str, result: IngestResult) -> bool:
        """Fast path for a clean batch no larger than one event may be (so no event in it can be
        oversized): decode the whole array in one msgspec call (~0.3 us per event less than
        splitting and decoding each, measured here). ``False`` - nothing added - as soon as any
        event is not clean; the per-event path then says which and why."""
        try:
            events = batch_event_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return False
        policy, bounds = self.policy, result.bounds
        if not all(map(_clean, events, repeat(bounds))) or (
            policy.known_accounts is not None
            and not policy.known_accounts.issuperset(event.subject for event in events)
        ):
            return False
        result.accepted.add(events, self.partitioner, origin)
        return True


def _exact(quantity: Decimal) -> bool:
    """At most ``MAX_DIGITS`` significant digits (a finite quantity: checked before)."""
    return len(quantity.as_tuple().digits) <= MAX_DIGITS


def _clean(event: UsageEvent, bounds: _TimeBounds) -> bool:
    """``_check``'s common case in one expression: True only for an event ``_check`` passes
    (known accounts aside: the caller checks those), i.e. within the time bounds, every decimal
    quantity finite, within bounds and of bounded digits (``_exact``), VRAM allocated within total,
    utilization at most 1. False sends the batch through ``_check`` for the reason."""
    if not bounds.earliest <= event.time <= bounds.latest:
        return False
    try:  # comparing a NaN raises; infinities fail the bounds before ``_exact`` sees them
        if type(event) is GpuUsageEvent:
            gpu = event.data
            return (
                _ZERO <= gpu.vram_allocated_gb <= gpu.vram_total_gb <= MAX_QUANTITY
                and _ZERO <= gpu.power_watts <= MAX_QUANTITY
                and _ZERO <= gpu.utilization <= 1
                and all(
                    map(_exact, (gpu.vram_allocated_gb, gpu.vram_total_gb, gpu.power_watts, gpu.utilization))
                )
            )
        if type(event) is StorageUsageEvent:
            return _ZERO <= event.data.gb <= MAX_QUANTITY and _exact(event.data.gb)
        if type(event) is SessionStartedEvent:
            started = event.data
            return all(
                quantity is None or (_ZERO <= quantity <= MAX_QUANTITY and _exact(quantity))
                for quantity in (started.vram_total_gb, started.vram_allocated_gb)
            )
    except ArithmeticError:
        return False
    return True


def _split(
    value: bytes | None, origin: str, max_message_bytes: int, result: IngestResult
) -> tuple[Sequence[bytes | msgspec.Raw], bool] | None:
    """A message's events (raw, not decoded yet) and whether it was a batch; ``None`` when the
    whole message is rejected (empty, oversized, or a JSON array that does not parse)."""
    if not value:
        result.rejected.append(_reject(Reason.MALFORMED_JSON, "empty message", b"", origin))
        return None
    if len(value) > max_message_bytes:
        detail = f"message of {len(value)} bytes exceeds {max_message_bytes}"
        result.rejected.append(_reject(Reason.OVERSIZED, detail, value, origin))
        return None
    first = value[:1]
    if first in _WHITESPACE_BYTES:  # rare: strip only then (lstrip copies the whole message)
        first = value.lstrip(_WHITESPACE)[:1]
    if first != b"[":
        return (value,), False
    try:
        return batch_splitter.decode(value), True
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: arrays nested ~1000 deep
        result.rejected.append(_reject(Reason.MALFORMED_JSON, f"not a JSON array: {exc!r}", value, origin))
        return None


def _reject(
    reason: Reason, detail: str, raw: bytes | msgspec.Raw, origin: str, index: int | None = None
) -> Rejection:
    where = origin if index is None else f"{origin}#{index}"
    original = raw if isinstance(raw, bytes) else bytes(raw)
    return Rejection(reason=reason, detail=detail, original=original, origin=where, stage=Stage.INGEST)


def _classify(message: str) -> Reason:
    """Map a msgspec validation message to a reason code."""
    if message.endswith("- at `$.type`") and message.startswith("Invalid value"):
        return Reason.UNKNOWN_TYPE
    if "` >= 0 - at `" in message:
        return Reason.NEGATIVE_QUANTITY
    return Reason.SCHEMA_VIOLATION


def _check(  # noqa: PLR0911  # one early return per rule reads better than a rule table here
    event: UsageEvent, policy: IngestPolicy, bounds: _TimeBounds
) -> tuple[Reason, str] | None:
    """Checks msgspec cannot express; ``None`` when the event is fine."""
    if event.time > bounds.latest:
        return (
            Reason.TOO_FAR_IN_FUTURE,
            f"time {event.time.isoformat()} is ahead of now {bounds.now.isoformat()}",
        )
    if event.time < bounds.earliest:
        return (
            Reason.TOO_LATE,
            f"time {event.time.isoformat()} is older than the {policy.horizon.days}-day horizon",
        )
    if policy.known_accounts is not None and event.subject not in policy.known_accounts:
        return Reason.UNKNOWN_ACCOUNT, f"subject {event.subject!r} is not a known account"
    if type(event) is GpuUsageEvent:
        data = event.data
        problem = (
            _check_quantity("vram_total_gb", data.vram_total_gb)
            or _check_quantity("vram_allocated_gb", data.vram_allocated_gb)
            or _check_quantity("power_watts", data.power_watts)
            or _check_quantity("utilization", data.utilization)
        )
        if problem is not None:
            return problem
        if data.vram_allocated_gb > data.vram_total_gb:
            return Reason.SCHEMA_VIOLATION, "vram_allocated_gb exceeds vram_total_gb - at `$.data`"
        if data.utilization > 1:
            return (
                Reason.SCHEMA_VIOLATION,
                "utilization is a fraction and must be <= 1 - at `$.data.utilization`",
            )
    elif type(event) is StorageUsageEvent:
        return _check_quantity("gb", event.data.gb)
    elif type(event) is SessionStartedEvent:
        started = event.data
        if started.vram_total_gb is not None and (
            problem := _check_quantity("vram_total_gb", started.vram_total_gb)
        ):
            return problem
        if started.vram_allocated_gb is not None:
            return _check_quantity("vram_allocated_gb", started.vram_allocated_gb)
    return None


def _check_quantity(name: str, value: Decimal) -> tuple[Reason, str] | None:
    # Fast path first: the common, valid case (NaN cannot be compared: is_finite goes first).
    if value.is_finite() and _ZERO <= value <= MAX_QUANTITY and _exact(value):
        return None
    where = f" - at `$.data.{name}`"
    if not value.is_finite():
        return Reason.SCHEMA_VIOLATION, f"{name} must be a finite number, got {value}{where}"
    if value < 0:
        return Reason.NEGATIVE_QUANTITY, f"{name} is {value}, must be >= 0{where}"
    if value > MAX_QUANTITY:
        return Reason.SCHEMA_VIOLATION, f"{name} is {value}, must be <= {MAX_QUANTITY}{where}"
    return Reason.SCHEMA_VIOLATION, f"{name} has more than {MAX_DIGITS} significant digits{where}"


def ingest_core(settings: AgentSettings) -> IngestCore:
    """The core as the settings configure it (one per worker: its partition cache is shared)."""
    policy = IngestPolicy(
        max_message_bytes=settings.max_message_bytes,
        max_event_bytes=settings.max_event_bytes,
        future_tolerance=settings.future_tolerance,
        horizon=settings.dedupe_horizon,
        known_accounts=settings.known_accounts(),
    )
    return IngestCore(policy, Partitioner(settings.partitions))


def rejection_message(topic: str, rejection: Rejection) -> Outgoing:
    """A dead-letter record: the original bytes, the reason in headers (schemas.rejections)."""
    return Outgoing(topic, rejection.original, headers=rejection.headers())


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch of an aware time (the native core's time bounds)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
