"""What the meter's windows keep in the partition store: the keys, and the records.

Every key starts with NUL: identity marks (dedupe) share the store, and their keys are
``source\x00id`` with a non-empty source. Open windows and sessions are written by the native
core (native/src/state.rs, sessions.rs); closed windows and period states by ``agents.window``.
"""

from __future__ import annotations

from calendar import monthrange
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec

from agents.rating import LinearPeriod, PeriodFees, SegmentedPeriod
from sinks.statestore import Store

OPEN = b"\x00o"  # + window key: an open window's Tally
CLOSED = b"\x00c"  # + window key: a window's last adjustment (its revision; ``closed_revision``)
LINEAR = b"\x00l"  # + period key: a time meter's billing period (LinearPeriod)
SEGMENTS = b"\x00m"  # + period key: a period meter's billing period (SegmentedPeriod)
FEES = b"\x00f"  # + period key: an account's API tier fees in a period (PeriodFees)
SESSION = b"\x00s"  # + [account, session id]: a compute session's ends (native/src/sessions.rs)
GPU_SESSION = b"\x00g"  # + [account, session id]: a GPU session (native/src/sessions.rs)
WATERMARK = b"\x00watermark"  # the partition's watermark, epoch seconds as text

Dims = tuple[tuple[str, str], ...]
WindowKey = tuple[str, str, Dims, int]  # account, meter, dimensions, window start (epoch seconds)

codec = msgspec.msgpack.Encoder()
_key_decoder = msgspec.msgpack.Decoder(tuple[str, str, list[tuple[str, str]], int])


class Tally(msgspec.Struct, array_like=True, gc=False):
    """A window's usage (native/src/state.rs writes it): quantity, exact amount (the part over 1,
    plus ``fractions``: (denominator, numerator) of GPU rates with a VRAM share), unit, the
    price-book version and book, when its plan-and-version segment began, GPU provider and platform
    fee percent. ``revision`` and ``charged`` are -1 and 0 in every record written now (``CLOSED``
    records were Tallies before, with their last revision: ``closed_revision`` reads both)."""

    quantity: Decimal | int  # int for counted meters (requests, tokens, seconds)
    amount: Decimal
    unit: str
    version: str
    provider: str | None = None
    revision: int = -1
    charged: int = 0
    book: str | None = None
    since: int = 0
    fee_percent: Decimal | None = None
    fractions: list[tuple[Decimal, Decimal]] = msgspec.field(default_factory=list)

    def rest(self) -> Fraction:
        """The amount over denominators other than 1 (VRAM shares that do not come out even)."""
        return sum(
            (Fraction(numerator) / Fraction(denominator) for denominator, numerator in self.fractions),
            Fraction(0),
        )

    def exact(self) -> Fraction:
        return Fraction(self.amount) + self.rest()


tally_decoder = msgspec.msgpack.Decoder(Tally)
_closed_decoder = msgspec.msgpack.Decoder(int | Tally)


def closed_revision(raw: bytes | None) -> int:
    """A closed window's last revision (its ``CLOSED`` record): 0, its close, when it has had no
    adjustment. What it charged is its billing period's (``LINEAR``, ``SEGMENTS``)."""
    if raw is None:
        return 0
    found = _closed_decoder.decode(raw)
    return found if isinstance(found, int) else found.revision


period_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    kind: msgspec.msgpack.Decoder(kind) for kind in (LinearPeriod, SegmentedPeriod, PeriodFees)
}


def state_key(prefix: bytes, key: WindowKey) -> bytes:
    account, meter, dims, start = key
    return prefix + codec.encode((account, meter, dims, start))


def decode_key(raw: bytes) -> WindowKey:
    account, meter, dims, start = _key_decoder.decode(raw[len(OPEN) :])
    return account, meter, tuple(dims), start


def utc_time(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@lru_cache(maxsize=4096)  # the windows a close rates share a few periods
def period_of(epoch: int) -> tuple[int, int]:
    """The billing period (a UTC calendar month) holding ``epoch``: (start, end) in epoch seconds."""
    moment = utc_time(epoch)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    days = monthrange(moment.year, moment.month)[1]
    return int(start.timestamp()), int(start.timestamp()) + days * 86_400


class Stored(NamedTuple):
    """What a partition store holds of the windows: its ``OPEN`` and ``GPU_SESSION`` entries as
    stored, and the watermark (``load``)."""

    open_windows: list[tuple[bytes, bytes]]
    gpu_sessions: list[tuple[bytes, bytes]]
    watermark: int

    @classmethod
    def load(cls, store: Store) -> Stored:
        raw = store.get(WATERMARK)
        return cls(list(store.items(OPEN)), list(store.items(GPU_SESSION)), int(raw) if raw else 0)

    @classmethod
    def nothing(cls) -> Stored:
        return cls([], [], 0)
