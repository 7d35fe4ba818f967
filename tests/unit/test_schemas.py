"""The committed JSON Schema files are what the models export, and they describe real events."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.charges import CHARGE_NAMESPACE, charge_id
from schemas.events import EVENT_TYPES, GpuUsageEvent, cut_by_size, encode_batch, encoder, event_decoder
from schemas.export import JSON_DIR, rendered


def test_committed_json_schemas_match_the_models() -> None:
    expected = rendered()
    committed = {p.name: p.read_text(encoding="utf-8") for p in JSON_DIR.glob("*.schema.json")}
    assert set(committed) == set(expected), "run `make schemas` and commit schemas/json/"
    for name, text in expected.items():
        assert committed[name] == text, f"{name} drifted from schemas/events.py: run `make schemas`"


def test_every_event_type_has_a_schema_naming_its_type() -> None:
    for event_type in EVENT_TYPES:
        schema = json.loads((JSON_DIR / f"{event_type}.schema.json").read_text(encoding="utf-8"))
        assert event_type in json.dumps(schema)
        assert "specversion" in json.dumps(schema)


def test_decimal_quantities_accept_numbers_and_strings_exactly() -> None:
    base = (
        b'{"specversion":"1.0","id":"e1","source":"s","type":"gpu.usage.v1","time":"2026-11-24T10:00:00Z",'
        b'"subject":"acct-1","data":{"session_id":"x","provider_id":"p","node_id":"n","gpu_model":"a100",'
        b'"vram_total_gb":24,"vram_allocated_gb":"12.1","power_watts":350.25,"utilization":0.1,'
        b'"interval_seconds":60}}'
    )
    event = event_decoder.decode(base)
    assert isinstance(event, GpuUsageEvent)
    assert str(event.data.vram_allocated_gb) == "12.1"
    assert str(event.data.power_watts) == "350.25"  # read from the JSON text, not through a float
    assert str(event.data.utilization) == "0.1"
    assert b'"power_watts":"350.25"' in encoder.encode(event)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_schema_files_are_valid_json_objects(event_type: str) -> None:
    schema = msgspec.json.decode((JSON_DIR / f"{event_type}.schema.json").read_bytes())
    assert schema["$schema"].startswith("https://json-schema.org/")


@given(
    st.lists(st.integers(min_value=0, max_value=300), max_size=60), st.integers(min_value=3, max_value=1_000)
)
def test_cut_by_size_keeps_every_item_in_order_within_the_limit(sizes: list[int], limit: int) -> None:
    items = [b"x" * size for size in sizes]
    chunks = list(cut_by_size(items, limit))
    assert [item for chunk in chunks for item in chunk] == items
    for chunk in chunks:
        assert chunk, "no empty message"
        assert len(encode_batch(chunk)) <= limit or len(chunk) == 1
    for first, second in itertools.pairwise(chunks):
        assert len(encode_batch([*first, second[0]])) > limit, (
            "a chunk is cut only when the next item does not fit"
        )


@given(
    account=st.text(min_size=1, max_size=40),
    meter=st.text(min_size=1, max_size=30),
    dimensions=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4),
    start=st.datetimes(timezones=st.just(UTC)),
    revision=st.integers(min_value=0, max_value=10**6),
)
def test_charge_ids_are_the_rfc_4122_uuid5_of_the_window_identity(
    account: str, meter: str, dimensions: dict[str, str], start: datetime, revision: int
) -> None:
    """The fast path computes exactly what uuid.uuid5 would (ids already stored must not move)."""
    dims = ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))
    name = f"{account}\x1f{meter}\x1f{dims}\x1f{start.isoformat()}\x1f{revision}"
    expected = uuid.uuid5(CHARGE_NAMESPACE, name)
    got = charge_id(account, meter, dimensions, start, revision)
    assert got == expected
    assert (got.version, got.variant, str(got)) == (5, uuid.RFC_4122, str(expected))
