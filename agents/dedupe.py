"""Dedupe: the first step of the meter, ``usage.valid`` -> ``usage.accepted`` (pure core).

An event's identity is (source, id) (DESIGN.md "Identity"). Ingest already routed every event by
account, so all events of an account, and so every repeat of one (source, id) sent for that
account, reach the same partition, in order. Per event:

1. fingerprint the normalized bytes ingest wrote (xxh3-128, ~0.07 us against ~0.6 us for
   blake2b here; ingest's canonical encoding makes equal payloads byte-equal, whatever spacing, key
   order or UTC offset the producer used). It is not a cryptographic hash: a producer could forge
   a different payload with an equal fingerprint under an id it already used, and lose only its
   own event (dropped as a duplicate instead of dead-lettered as a conflict);
2. look the identity up, first in this transaction's pending marks, then in the partition store;
3. unseen -> accepted, and a mark (identity -> fingerprint) is added to the pending marks;
   seen with the same fingerprint -> duplicate, dropped and counted;
   seen with another fingerprint -> ``id_conflict`` to the dead-letter topic.

The pending marks leave this core as one changelog message per transaction (``encode_marks``), not
one write per event: state changes are written once per commit, as Kafka Streams' record cache does.
The shell (``pipeline.transactional``) commits that message, the accepted batch, the rejections and
the consumed offsets in one Kafka transaction, and only then applies the marks to the local store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import xxhash

from schemas.events import batch_splitter, cut_by_size, identity_decoder
from schemas.rejections import Reason, Rejection, Stage

FINGERPRINT_BYTES = 16
# A changelog record is cut at about this size (Kafka's default max.message.bytes is 1 MiB).
MARKS_RECORD_BYTES = 512 * 1024

marks_encoder = msgspec.msgpack.Encoder()
marks_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, bytes]])


@dataclass(slots=True)
class DedupeResult:
    # Accepted events as slices of the input (msgspec.Raw): joined into the output without a copy.
    accepted: list[bytes | msgspec.Raw] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: int = 0
    # identity -> fingerprint, first sighting in this transaction; insertion-ordered.
    marks: dict[bytes, bytes] = field(default_factory=dict)


def identity_key(source: str, event_id: str) -> bytes:
    # NUL cannot occur in either part (the schema allows printable characters only).
    return f"{source}\x00{event_id}".encode()


def fingerprint(normalized_event: bytes | msgspec.Raw) -> bytes:
    digest: bytes = xxhash.xxh3_128_digest(normalized_event)
    return digest


def dedupe_message(
    value: bytes | None,
    origin: str,
    lookup: Callable[[bytes], bytes | None],
    result: DedupeResult,
) -> None:
    """Dedupe one ``usage.valid`` message (a batch written by ingest) into ``result``.

    ``lookup`` reads the committed marks (the partition store). Malformed input cannot come from
    ingest, but a foreign producer could write anything to the topic: it is rejected, never raised.
    """
    try:
        elements = batch_splitter.decode(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        result.rejected.append(
            _reject(Reason.MALFORMED_JSON, f"not a CloudEvents batch: {exc}", value or b"", origin)
        )
        return
    pending = result.marks
    for index, element in enumerate(elements):
        raw = bytes(element)
        try:
            ident = identity_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            result.rejected.append(_reject(Reason.SCHEMA_VIOLATION, str(exc), raw, f"{origin}#{index}"))
            continue
        key = identity_key(ident.source, ident.id)
        print_ = fingerprint(raw)
        seen = pending.get(key)
        if seen is None:
            seen = lookup(key)
        if seen is None:
            pending[key] = print_
            result.accepted.append(raw)
        elif seen == print_:
            result.duplicates += 1
        else:
            detail = (
                f"(source, id) = ({ident.source!r}, {ident.id!r}) was seen before with a different payload"
            )
            result.rejected.append(_reject(Reason.ID_CONFLICT, detail, raw, f"{origin}#{index}"))


def encode_marks(marks: dict[bytes, bytes], limit: int = MARKS_RECORD_BYTES) -> list[bytes]:
    """The changelog records for ``marks``: msgpack lists of (identity, fingerprint), each under
    ``limit`` bytes (cut by each mark's own size: identities range from a few bytes to ~770)."""
    items = list(marks.items())
    # msgpack framing: a bin header (<= 5 bytes) per part and 1 per pair; 12 covers it.
    sizes = [len(key) + FINGERPRINT_BYTES + 12 for key in marks]
    return [marks_encoder.encode(chunk) for chunk in cut_by_size(items, limit, sizes)]


def decode_marks(value: bytes) -> list[tuple[bytes, bytes]]:
    return marks_decoder.decode(value)


def _reject(reason: Reason, detail: str, raw: bytes, origin: str) -> Rejection:
    return Rejection(reason=reason, detail=detail, original=raw, origin=origin, stage=Stage.METER)
