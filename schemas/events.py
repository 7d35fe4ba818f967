"""Event contracts: the CloudEvents 1.0 envelope and the usage payloads producers write
(docs/ARCHITECTURE.md, "Following one event").

One Kafka message carries either a single structured CloudEvent (a JSON object) or a CloudEvents
batch (``application/cloudevents-batch+json``: a JSON array of them). Each event type is a msgspec
struct tagged by the envelope's ``type``, so decoding and validating an event is one pass (~0.8 us
for a 300-byte event here, against ~4.2 us with pydantic v2). The JSON Schema files under
``schemas/json/`` are exported from these classes (``python -m schemas.export``) and a test fails
when they drift.

Quantities that feed money (VRAM, watts, GB, utilization) are ``Decimal``: producers may send a JSON
number or a decimal string, and Tally never turns either into a float. Integer counts carry their
bounds in the schema; decimal bounds are checked in ``agents.ingest`` after decoding, because
msgspec's range constraints apply to int and float only.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence, Sized
from datetime import datetime
from decimal import Decimal
from itertools import accumulate
from typing import Annotated, Literal, TypeVar

import msgspec
import xxhash

T = TypeVar("T", bound=Sized)

# Identifiers and labels are bounded so one event cannot carry megabytes in a key. Only the subject
# (the partitioning key) is held to a pattern: a regex per string field costs ~0.2 us here, and
# a GPU heartbeat has eight of them (2.5 us with patterns against 0.8 us without).
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
AccountId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$",
        description="The account billed for this event (CloudEvents `subject`).",
    ),
]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
AwareTime = Annotated[
    datetime,
    msgspec.Meta(tz=True, description="RFC 3339 timestamp with a UTC offset; stored as UTC."),
]
# Counts: up to 10^12 per event. A larger value is a producer bug, not usage.
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_000)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=31 * 86_400)]
Quantity = Annotated[
    Decimal,
    msgspec.Meta(
        description=(
            "Non-negative decimal, as a JSON number or a decimal string (exact, never a float):"
            " at most 10^15, of at most 28 significant digits."
        ),
        extra_json_schema={"minimum": 0, "pattern": r"^[0-9]{1,15}(\.[0-9]{1,12})?$"},
    ),
]


# Payloads ------------------------------------------------------------------------------------


class GpuUsage(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """A GPU rental heartbeat: what one session held over ``interval_seconds``."""

    session_id: Ident
    provider_id: Ident
    node_id: Ident
    gpu_model: Label  # e.g. rtx_4090, a100, h100: the price book's key
    gpu_count: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    vram_total_gb: Quantity
    vram_allocated_gb: Quantity  # fractional rental: 12 of 24 GB is half the card
    power_watts: Quantity
    utilization: Quantity  # 0..1 fraction of compute used in the interval
    interval_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)]
    region: Label | None = None


class ApiRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """API usage: requests (and tokens) served for one endpoint and product."""

    endpoint: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    request_count: Count = 1
    tokens_in: Count = 0
    tokens_out: Count = 0
    product_id: Label | None = None  # e.g. gpt-4: per-product unit prices
    service_type: Label = "api_gateway"  # model_inference, mcp_service, agent_execution, ...
    status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200  # HTTP status of the request
    latency_ms: Count | None = None
    region: Label | None = None


class StorageUsage(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """Storage held over time: ``gb`` held for ``duration_seconds`` (priced per GB-month)."""

    storage_kind: Label  # bucket, filestore, ...
    resource_id: Ident
    gb: Quantity
    duration_seconds: Annotated[int, msgspec.Meta(ge=1, le=31 * 86_400)]
    region: Label | None = None


class SessionStarted(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """A compute or GPU session began."""

    session_id: Ident
    provider_id: Ident | None = None
    node_id: Ident | None = None
    gpu_model: Label | None = None
    vram_total_gb: Quantity | None = None
    vram_allocated_gb: Quantity | None = None
    resource_tier: Label | None = None  # small, medium, large, gpu
    region: Label | None = None


class SessionEnded(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """A session ended; ``reason`` says why (completed, user_stopped, insufficient_funds, ...)."""

    session_id: Ident
    reason: Label = "completed"
    duration_seconds: Seconds | None = None


# Envelopes -----------------------------------------------------------------------------------


# gc=False: event structs hold only scalars, strings and decimals (no reference cycles), so the
# cyclic garbage collector need not track the ~2 structs made per event (msgspec's own advice).
class _Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, tag_field="type", gc=False):
    specversion: Literal["1.0"]
    id: Ident
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    time: AwareTime
    subject: AccountId
    datacontenttype: Literal["application/json"] | None = None
    dataschema: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class GpuUsageEvent(_Envelope, tag="gpu.usage.v1"):
    data: GpuUsage


class ApiRequestEvent(_Envelope, tag="api.request.v1"):
    data: ApiRequest


class StorageUsageEvent(_Envelope, tag="storage.usage.v1"):
    data: StorageUsage


class SessionStartedEvent(_Envelope, tag="session.started.v1"):
    data: SessionStarted


class SessionEndedEvent(_Envelope, tag="session.ended.v1"):
    data: SessionEnded


UsageEvent = GpuUsageEvent | ApiRequestEvent | StorageUsageEvent | SessionStartedEvent | SessionEndedEvent

EVENT_CLASSES: tuple[type[_Envelope], ...] = (
    GpuUsageEvent,
    ApiRequestEvent,
    StorageUsageEvent,
    SessionStartedEvent,
    SessionEndedEvent,
)
EVENT_TYPES: frozenset[str] = frozenset(str(cls.__struct_config__.tag) for cls in EVENT_CLASSES)

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
SINGLE_CONTENT_TYPE = "application/cloudevents+json"


class EventIdentity(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    """The fields dedupe needs from a normalized event, decoded without the rest (~0.3 us)."""

    id: str
    source: str
    subject: str


# Decoders and encoders are built once: msgspec compiles them per type.
event_decoder: msgspec.json.Decoder[UsageEvent] = msgspec.json.Decoder(UsageEvent)
identity_decoder: msgspec.json.Decoder[EventIdentity] = msgspec.json.Decoder(EventIdentity)
batch_splitter: msgspec.json.Decoder[list[msgspec.Raw]] = msgspec.json.Decoder(list[msgspec.Raw])
batch_event_decoder: msgspec.json.Decoder[list[UsageEvent]] = msgspec.json.Decoder(list[UsageEvent])
encoder = msgspec.json.Encoder(decimal_format="string")


# Batch messages Tally writes are cut at this size: a Kafka message must stay under the topic's
# max.message.bytes (1 MiB by default) even when a poll brings ~20 MiB of events for one partition.
MAX_BATCH_BYTES = 512 * 1024


# What the Python ingest core makes of each accepted event of a message the native fast path
# declined: (identity, fingerprint, normalized CloudEvent JSON, the decoded event); the meter hands
# the first three to the native dedupe and windows (agents/meter.py).
ValidRecord = tuple[bytes, bytes, bytes, UsageEvent]


def identity_key(source: str, event_id: str) -> bytes:
    """An event's identity, (source, id), as a store key. NUL cannot occur in either part."""
    return f"{source}\x00{event_id}".encode()


def fingerprint(normalized_event: bytes | msgspec.Raw) -> bytes:
    """xxh3-128 of the normalized event (~0.07 us against ~0.6 us for blake2b here). Not
    cryptographic: a producer could forge a different payload with an equal fingerprint under an
    id it already used, and lose only its own event (dropped as a duplicate, not a conflict)."""
    digest: bytes = xxhash.xxh3_128_digest(normalized_event)
    return digest


def encode_batch(events: Sequence[bytes | msgspec.Raw]) -> bytes:
    """Join already-encoded events into one CloudEvents batch without re-encoding them."""
    return b"[" + b",".join(events) + b"]"


_plus_one = (1).__add__


def cut_by_size(
    items: Sequence[T], limit: int = MAX_BATCH_BYTES, sizes: Sequence[int] | None = None
) -> Iterator[Sequence[T]]:
    """Split items into runs whose joined size (a separator each, plus brackets) stays under
    ``limit``; an item larger than ``limit`` travels alone. ``sizes`` defaults to each item's
    ``len``. Sizes are summed in C (``accumulate``): no Python loop per item."""
    ends = list(accumulate(map(_plus_one, map(len, items) if sizes is None else sizes)))
    start, base = 0, 0
    while start < len(items):
        # The last item that still fits after ``start``: ends[end - 1] - base + 1 <= limit.
        end = bisect_right(ends, base + limit - 1, lo=start)
        end = max(end, start + 1)
        yield items[start:end]
        base = ends[end - 1]
        start = end
