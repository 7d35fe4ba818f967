"""The dead-letter contract: why an event was not accepted, with the original kept for replay.

A rejected event goes to ``usage.rejected`` as its original bytes, untouched, with the reason in
Kafka headers (the Kafka Connect DLQ convention), so any client can read, fix and replay it:

| header | value |
|---|---|
| ``tally.reason`` | a code from ``Reason`` |
| ``tally.detail`` | what exactly was wrong, e.g. ``Expected `int` >= 0 - at `$.data.request_count` `` |
| ``tally.stage`` | ``ingest`` or ``meter`` |
| ``tally.origin`` | ``<topic>/<partition>/<offset>[#<index in batch>]`` of the input |
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

# usage.raw takes producer messages up to 4 MiB, beyond the ingest limit (1 MiB by default), so an
# oversized message arrives and is dead-lettered rather than refused at the producer. A dead letter
# keeps any of them whole, plus its headers (each cut at 1 KiB): 4 MiB + 64 KiB.
MAX_RAW_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_DEAD_LETTER_BYTES = MAX_RAW_MESSAGE_BYTES + 64 * 1024


class Reason(StrEnum):
    """The closed list of rejection reasons."""

    MALFORMED_JSON = "malformed_json"  # not JSON at all, or JSON with NaN/Infinity
    SCHEMA_VIOLATION = "schema_violation"  # JSON, but not a valid event of its type
    UNKNOWN_TYPE = "unknown_type"  # a `type` Tally does not know
    NEGATIVE_QUANTITY = "negative_quantity"  # usage below zero
    TOO_LATE = "too_late"  # older than the correction horizon
    TOO_FAR_IN_FUTURE = "too_far_in_future"  # stamped ahead of now beyond the clock-skew tolerance
    OVERSIZED = "oversized"  # message or event larger than allowed
    ID_CONFLICT = "id_conflict"  # a (source, id) seen before with a different payload
    UNKNOWN_ACCOUNT = "unknown_account"  # subject is not a known account
    UNPRICED = "unpriced"  # the account's price book has no price for it (e.g. a GPU model)
    SESSION_CONFLICT = "session_conflict"  # a session's second start (or end) differs from its first


class Stage(StrEnum):
    INGEST = "ingest"
    METER = "meter"
    LEDGER = "ledger"
    ANALYTICS = "analytics"


class Rejection(msgspec.Struct, frozen=True):
    """One rejected event (or whole message, when it cannot be split into events)."""

    reason: Reason
    detail: str
    original: bytes
    origin: str  # <topic>/<partition>/<offset>[#index]
    stage: Stage

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("tally.reason", self.reason.value.encode()),
            ("tally.detail", self.detail.encode()[:1024]),
            ("tally.stage", self.stage.value.encode()),
            ("tally.origin", self.origin.encode()),
        ]


def reason_of(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> str | None:
    """The ``tally.reason`` header of a dead-letter record, if any."""
    for name, value in headers:
        if name == "tally.reason":
            return value.decode()
    return None


def rejection_counters(rejections: list[Rejection]) -> dict[str, int]:
    """``rejected.<reason>`` -> count, for a stage's counters."""
    counts: dict[str, int] = {}
    for rejection in rejections:
        name = f"rejected.{rejection.reason}"
        counts[name] = counts.get(name, 0) + 1
    return counts
