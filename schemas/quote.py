"""``tally quote`` input: one usage line per JSON line, the events' ``data`` payloads with ``type``,
``subject``, ``time`` and optionally ``plan`` (an API tier, or a user type for compute)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.events import AccountId, ApiRequest, AwareTime, GpuUsage, SessionEnded, StorageUsage


class _QuoteLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    subject: AccountId
    time: AwareTime
    plan: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


class GpuQuote(_QuoteLine, tag="gpu.usage.v1"):
    data: GpuUsage
    # The provider's minimum hourly rate, when the provider set one.
    provider_minimum: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}(\.[0-9]{1,12})?$")] | None = None


class ApiQuote(_QuoteLine, tag="api.request.v1"):
    data: ApiRequest


class StorageQuote(_QuoteLine, tag="storage.usage.v1"):
    data: StorageUsage


class ComputeQuote(_QuoteLine, tag="session.ended.v1"):
    data: SessionEnded
    resource_tier: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


QuoteLine = GpuQuote | ApiQuote | StorageQuote | ComputeQuote
quote_decoder: msgspec.json.Decoder[QuoteLine] = msgspec.json.Decoder(QuoteLine)
