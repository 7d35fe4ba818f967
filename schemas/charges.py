"""Charge records: what rating produces and the ledger stores (DESIGN.md "Charge identity").

A charge is identified by UUIDv5 over (account, meter, dimensions, window start, revision): the
same window rated again (a replay, a second worker) gets the same id, so every sink can be
idempotent on it; a late event produces a new revision, an adjustment, never an edit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

# Fixed namespace for charge ids (uuid5 of the project's name in the URL namespace).
CHARGE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:tally:charge")


def charge_id(
    account: str, meter: str, dimensions: dict[str, str], window_start: datetime, revision: int
) -> uuid.UUID:
    dims = ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))
    name = f"{account}\x1f{meter}\x1f{dims}\x1f{window_start.isoformat()}\x1f{revision}"
    return uuid.uuid5(CHARGE_NAMESPACE, name)


# What the ledger checks on decoding (a foreign producer could write anything to ``charges``):
# amounts fit Postgres' bigint and are not negative, decimals are decimal text Postgres' numeric
# reads (``str(Decimal)``, exponent included), times carry a zone.
BaseUnits = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
DecimalText = Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$", max_length=100)]
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


class Charge(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One rated charge line of one account's window, in the token's base units."""

    charge_id: uuid.UUID
    account: str
    meter: str
    dimensions: dict[str, str]
    window_start: AwareTime
    revision: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    quantity: DecimalText  # exact decimal text
    unit: str
    unit_price: DecimalText  # exact decimal text
    amount_base_units: BaseUnits
    price_version: str
    # When set, the charge pays a provider (GPU rental): the platform fee is split off it.
    provider_id: str | None = None
    platform_fee_base_units: BaseUnits = 0
    # When the meter closed the window (wall clock): the ledger's recorded_at minus this is the
    # window-close -> charge-row latency (bench/meter).
    rated_at: AwareTime | None = None


# The ``charges`` topic: each message a JSON array of charges of accounts on one partition.
charges_decoder: msgspec.json.Decoder[list[Charge]] = msgspec.json.Decoder(list[Charge])
charges_encoder = msgspec.json.Encoder()
