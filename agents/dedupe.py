"""Dedupe: the meter's step after ingest, validated events -> accepted ones (pure core).

An event's identity is (source, id): its CloudEvents ``source`` and ``id``. Every event of an
account, and so every repeat of one (source, id) sent for that account, is deduped by the meter
task of the account's partition (ingest forwards events that came in on another partition). Per
event:

1. take the identity and fingerprint ingest computed (``schemas.events.ValidRecord``: xxh3-128
   of the normalized event, so equal payloads match whatever spacing, key order or UTC offset the
   producer used);
2. look the identity up, first in this transaction's pending marks, then in the partition store;
3. unseen -> accepted, and a mark (identity -> fingerprint) is added to the pending marks;
   seen with the same fingerprint -> duplicate, dropped and counted;
   seen with another fingerprint -> ``id_conflict`` to the dead-letter topic;
4. an accepted event the windows then refuse (``too_late``, ``unpriced``) is dead-lettered and its
   mark withdrawn before the next event is deduped, so a corrected copy is accepted wherever it
   comes, even next in the same message (before the compiled core, dedupe ran over a whole
   message first, so a copy in the same message met the refused one's mark).

The pending marks leave this core as one changelog message per transaction (``encode_marks``), not
one write per event: state changes are written once per commit, as Kafka Streams' record cache does.
The shell (``agents.transactional``) commits that message, the accepted batch, the rejections and
the consumed offsets in one Kafka transaction, and only then applies the marks to the local store.

Steps 1-4 run compiled, per event, inside the meter's native core (``settle`` in
native/src/meter.rs), which writes its marks' changelog records in this module's format and cut;
this module keeps the format (``encode_marks`` for the window core's changes, ``decode_marks``
for restores).
"""

from __future__ import annotations

import msgspec

from schemas.events import cut_by_size

# A changelog record is cut at about this size (Kafka's default max.message.bytes is 1 MiB).
MARKS_RECORD_BYTES = 512 * 1024

marks_encoder = msgspec.msgpack.Encoder()
marks_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, bytes]])


def encode_marks(marks: dict[bytes, bytes], limit: int = MARKS_RECORD_BYTES) -> list[bytes]:
    """The changelog records for ``marks`` (and the meter's other state changes): msgpack lists
    of (key, value), each under ``limit`` bytes, cut by each pair's own size (identities range
    from a few bytes to ~770, window states to a few hundred)."""
    items = list(marks.items())
    # msgpack framing: a bin header (<= 5 bytes) per part and 1 per pair; 12 covers it.
    sizes = [len(key) + len(value) + 12 for key, value in items]
    return [marks_encoder.encode(chunk) for chunk in cut_by_size(items, limit, sizes)]


def decode_marks(value: bytes) -> list[tuple[bytes, bytes]]:
    return marks_decoder.decode(value)
