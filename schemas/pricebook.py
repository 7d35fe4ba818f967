"""Price books: YAML files validated into typed models (docs/PRICING.md).

Prices are decimal strings (or YAML numbers, which the loader reads as ``Decimal`` from their text,
never through a float). A book holds versions by effective date, so usage is always rated at the
prices in force at its event time, re-ratings included. Every problem in a file is reported with
its path and its line (``load_price_book``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


def _digits(value: Decimal) -> Decimal:
    """Money is computed exactly (docs/PRICING.md) from prices of at most 28 significant digits,
    at most 10^15 and at most 18 decimal places: bounds that keep every product and sum the meter
    makes within its exact arithmetic. A price beyond them is a typo, not a price."""
    if not value.is_finite():
        raise ValueError("a price is a finite decimal")
    if len(value.as_tuple().digits) > 28:
        raise ValueError("a price has at most 28 significant digits")
    if value > Decimal(10) ** 15 or -value.as_tuple().exponent > 18:  # type: ignore[operator]  # finite: an int exponent
        raise ValueError("a price is at most 10^15, with at most 18 decimal places")
    return value


def _whole_second(moment: datetime) -> datetime:
    """Versions, demand steps and plan changes take effect on a whole second, so the second an
    event falls in says which one applies (the meter windows by the second)."""
    if moment.microsecond:
        raise ValueError("takes effect on a whole second (no fraction of a second)")
    return moment


EffectiveFrom = Annotated[AwareDatetime, AfterValidator(_whole_second)]


NonNegative = Annotated[Decimal, Field(ge=0), AfterValidator(_digits)]
Positive = Annotated[Decimal, Field(gt=0), AfterValidator(_digits)]
Percent = Annotated[Decimal, Field(ge=0, le=100), AfterValidator(_digits)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Pricing models ---------------------------------------------------------------------------------


class Tier(_Model):
    up_to: NonNegative | None = None  # None: no upper bound (the last tier)
    unit_price: NonNegative
    flat_fee: NonNegative = Decimal(0)


class _Pricing(_Model):
    # Usage below ``included`` is free (free tier, or usage included in a subscription).
    included: NonNegative = Decimal(0)
    # A line never charges less than this, once anything is charged.
    minimum: NonNegative = Decimal(0)


class Flat(_Pricing):
    model: Literal["flat"]
    amount: NonNegative


class PerUnit(_Pricing):
    model: Literal["per_unit"]
    unit_price: NonNegative


class Package(_Pricing):
    model: Literal["package"]
    package_size: Positive
    package_price: NonNegative


class _Tiered(_Pricing):
    tiers: list[Tier] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, tiers: list[Tier]) -> list[Tier]:
        bounds = [t.up_to for t in tiers]
        if any(b is None for b in bounds[:-1]):
            raise ValueError("only the last tier may leave up_to open")
        closed = [b for b in bounds if b is not None]
        if closed != sorted(closed) or len(set(closed)) != len(closed):
            raise ValueError("tier bounds must be strictly ascending")
        return tiers


class Graduated(_Tiered):
    model: Literal["tiered_graduated"]  # each slice of the quantity at its own tier's price


class Volume(_Tiered):
    model: Literal["tiered_volume"]  # the whole quantity at the price of the tier it reaches


Pricing = Annotated[Flat | PerUnit | Package | Graduated | Volume, Field(discriminator="model")]


# What a book prices -----------------------------------------------------------------------------


class DemandStep(_Model):
    """From ``effective_from`` on, GPU prices are multiplied by ``multiplier`` (market demand)."""

    effective_from: EffectiveFrom
    multiplier: Positive
    gpu_models: list[str] | None = None  # None: every model


class GpuRates(_Model):
    """GPU rental: per GPU model and hour, fractional VRAM, power, demand, fee."""

    base_rate_per_hour: dict[str, NonNegative] = Field(min_length=1)
    # fractional: the allocated share of the card's VRAM pays that share of the base rate;
    # per_gb_hour: the base rate is replaced by allocated GB x vram_rate_per_gb_hour.
    vram_pricing: Literal["fractional", "per_gb_hour"] = "fractional"
    vram_rate_per_gb_hour: NonNegative | None = None
    power_rate_per_watt_hour: NonNegative = Decimal("0.001")  # 350 W adds 0.35 per hour
    demand_multiplier: Positive = Decimal(1)
    # A schedule of demand multipliers (peak hours, a market feed written down): the last step in
    # force at a window's start applies; before the first step, ``demand_multiplier``.
    demand_schedule: list[DemandStep] = Field(default_factory=list)
    platform_fee_percent: Percent = Decimal(5)
    # Minimum hourly rate per provider id (a provider sets the least it rents for); the
    # meter floors each heartbeat's rate at its provider's minimum.
    provider_minimum_per_hour: dict[str, NonNegative] = Field(default_factory=dict)
    billing_granularity_seconds: Annotated[int, Field(ge=1, le=3600)] = 60  # per-minute billing
    minimum_session_minutes: Annotated[int, Field(ge=0, le=1440)] = 1

    @model_validator(mode="after")
    def _vram(self) -> GpuRates:
        if self.vram_pricing == "per_gb_hour" and self.vram_rate_per_gb_hour is None:
            raise ValueError("vram_pricing per_gb_hour needs vram_rate_per_gb_hour")
        return self

    @field_validator("demand_schedule")
    @classmethod
    def _in_time_order(cls, steps: list[DemandStep]) -> list[DemandStep]:
        return sorted(steps, key=lambda s: s.effective_from)

    def demand_at(self, when: datetime, gpu_model: str) -> Decimal:
        multiplier = self.demand_multiplier
        for step in self.demand_schedule:
            if step.effective_from > when:
                break
            if step.gpu_models is None or gpu_model in step.gpu_models:
                multiplier = step.multiplier
        return multiplier


class ApiTier(_Model):
    """An API plan tier: fee per billing period, included requests, overage (docs/PRICING.md)."""

    monthly_fee: NonNegative
    included_requests: Annotated[int, Field(ge=0)]
    overage_per_request: NonNegative
    # whole: a tier in force at any time of a period owes its whole fee; prorated: the share of
    # the period it was in force.
    fee_proration: Literal["whole", "prorated"] = "whole"
    # Requests whose status is not 2xx count against the quota and pay overage only when True.
    charge_failed: bool = False


class Product(_Model):
    """Per-product pricing of a usage quantity (e.g. 0.002 per unit of gpt-4)."""

    unit: str = "unit"
    pricing: Pricing
    # Tokens of requests whose status is not 2xx are charged only when True.
    charge_failed: bool = False


class PriceBookVersion(_Model):
    effective_from: EffectiveFrom
    gpu: GpuRates | None = None
    api_tiers: dict[str, ApiTier] = Field(default_factory=dict)
    products: dict[str, Product] = Field(default_factory=dict)
    # Compute sessions: user type -> resource tier -> price per hour.
    compute_per_hour: dict[str, dict[str, NonNegative]] = Field(default_factory=dict)
    # Storage: kind -> price per GB-month (a month is 30 days here: 720 hours).
    storage_per_gb_month: dict[str, NonNegative] = Field(default_factory=dict)
    one_time: dict[str, NonNegative] = Field(default_factory=dict)

    @cached_property
    def label(self) -> str:
        # Cached: the meter asks once per window and charge (strftime: ~4 us a call here).
        return self.effective_from.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Token(_Model):
    symbol: str = "USDC"
    decimals: Annotated[int, Field(ge=0, le=18)] = 6  # base units per token: 10**decimals


class PriceBook(_Model):
    name: str = Field(min_length=1, max_length=100)
    token: Token = Token()
    versions: list[PriceBookVersion] = Field(min_length=1)

    @field_validator("versions")
    @classmethod
    def _ordered(cls, versions: list[PriceBookVersion]) -> list[PriceBookVersion]:
        dates = [v.effective_from for v in versions]
        if len(set(dates)) != len(dates):
            raise ValueError("two versions take effect at the same time")
        return sorted(versions, key=lambda v: v.effective_from)

    def version_at(self, when: datetime) -> PriceBookVersion:
        """The version in force at ``when`` (an aware time)."""
        current = None
        for version in self.versions:
            if version.effective_from <= when:
                current = version
        if current is None:
            raise LookupError(f"price book {self.name!r} has no version in force at {when.isoformat()}")
        return current

    def version_labelled(self, label: str) -> PriceBookVersion | None:
        """The version whose label (its effective time) is ``label``, if the book still has it."""
        return next((v for v in self.versions if v.label == label), None)


# Loading, with every problem's path and line ----------------------------------------------------


class PriceBookError(ValueError):
    """A price book file is invalid; ``problems`` holds one ``file:line: path: message`` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid price book:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


class _DecimalLoader(yaml.SafeLoader):
    """YAML numbers with a fraction become ``Decimal`` from their text (``0.01`` stays exact)."""


_DecimalLoader.add_constructor(
    "tag:yaml.org,2002:float",
    lambda loader, node: Decimal(loader.construct_scalar(node)),  # type: ignore[arg-type]  # a scalar node here
)


def load_price_book(path: Path) -> PriceBook:
    text = path.read_text(encoding="utf-8")
    return parse_price_book(text, str(path))


def parse_price_book(text: str, source: str = "<price book>") -> PriceBook:
    try:
        root = yaml.compose(text, Loader=_DecimalLoader)
        data = yaml.load(text, Loader=_DecimalLoader)  # noqa: S506  # _DecimalLoader is a SafeLoader
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", -1) + 1
        raise PriceBookError([f"{source}:{line}: not valid YAML: {exc}"]) from None
    try:
        return PriceBook.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [part for part in error["loc"] if not _is_union_tag(part)]
            line = _line_of(root, loc)
            where = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{source}:{line}: {where}: {error['msg']}")
        raise PriceBookError(problems) from None


_PRICING_TAGS = frozenset({"flat", "per_unit", "package", "tiered_graduated", "tiered_volume"})


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the chosen union member's tag in an error's path; the file has no such key."""
    return isinstance(part, str) and part in _PRICING_TAGS


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int:
    """The 1-based line of the deepest node along ``loc`` that exists in the file."""
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line
