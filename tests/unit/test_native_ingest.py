"""The native fast path (tally_native.MeterCore) against the Python ingest core: on any message it
takes, it accepts exactly what agents/ingest.py accepts and writes the very same bytes; on the rest
it declines and changes nothing (the Python path then decides). Generated input, near every edge."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import tally_native
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agents.ingest import MAX_QUANTITY, IngestCore, IngestPolicy, Partitioner, epoch_micros
from agents.plans import AccountPlan, FixedPlans
from agents.window import WindowConfig, Windows
from agents.window_state import Stored
from pipeline.loadgen import Expected, LoadPlan, generate
from schemas.events import EVENT_CLASSES, cut_by_size, encode_batch
from tests.unit.meter_in_memory import BOOK

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
PARTITIONS = 3
POLICY = IngestPolicy(
    max_message_bytes=20_000,
    max_event_bytes=2_000,
    future_tolerance=timedelta(minutes=5),
    horizon=timedelta(days=35),
    known_accounts=None,
)
# The worker's defaults (a 100-event batch is ~35 KB).
DEFAULTS = IngestPolicy(1_048_576, 65_536, timedelta(minutes=5), timedelta(days=35))


class Record(msgspec.Struct):
    value: bytes | None
    offset: int = 7


def native(
    policy: IngestPolicy = POLICY, partition: int = 0, batch_bytes: int = 512 * 1024
) -> tally_native.MeterCore:
    nothing: dict[bytes, bytes] = {}
    windows = Windows(WindowConfig(), FixedPlans(AccountPlan(BOOK)), nothing.get, Stored.nothing())
    core = tally_native.MeterCore(
        windows.core,
        partition,
        PARTITIONS,
        policy.max_message_bytes,
        policy.max_event_bytes,
        batch_bytes,
        512 * 1024,
        policy.known_accounts,
        str(MAX_QUANTITY),
        nothing.get,
        lambda keys: [None for _ in keys],
    )
    core.begin(epoch_micros(NOW - policy.horizon), epoch_micros(NOW + policy.future_tolerance), 0)
    return core


def python(value: bytes, policy: IngestPolicy = POLICY) -> dict[int, list[tuple[bytes, bytes, bytes]]] | None:
    """What the Python core accepts of a message, per partition; None if it rejects anything."""
    core = IngestCore(policy, Partitioner(PARTITIONS))
    result = core.new_result(NOW)
    core.process(value, "usage.raw/0/7", result)
    if result.rejected:
        return None
    accepted = result.accepted.drain()
    return {p: [(key, print_, body) for key, print_, body, _ in records] for p, records in accepted}


def check(value: bytes, policy: IngestPolicy = POLICY) -> bool:
    """Run both paths over one message; True if the native one took it. Whatever it takes must
    be exactly what the Python one makes of it."""
    core = native(policy)
    taken = core.ingest([Record(value)], 0) == 1
    output = core.take()
    expected = python(value, policy)
    if not taken:
        assert (output.accepted, output.forwarded, output.marks, output.rejections) == ([], [], [], [])
        return False
    assert expected is not None, f"the native path took a message Python rejects: {value!r}"
    # This partition's events meet dedupe then the windows, event by event: a repeat is a
    # duplicate, or an id_conflict if its payload differs; a first sighting is accepted, or refused
    # by the windows (unpriced: the test's book has no price for a random GPU model), which
    # withdraws its mark at once.
    refused = [raw for reason, _, raw, _ in output.rejections if reason != "id_conflict"]
    pending: dict[bytes, bytes] = {}
    accepted_bodies, repeats, conflicts = [], 0, []
    for key, print_, body in expected.pop(0, []):
        if key not in pending:
            if body in refused:
                continue
            pending[key] = print_
            accepted_bodies.append(body)
        elif pending[key] == print_:
            repeats += 1
        else:
            conflicts.append(body)
    assert [raw for reason, _, raw, _ in output.rejections if reason == "id_conflict"] == conflicts
    accepted = [bytes(e) for m in output.accepted for e in msgspec.json.decode(m, type=list[msgspec.Raw])]
    assert accepted == accepted_bodies
    assert output.duplicates == repeats
    assert dict(output.marks) == pending
    forwarded = {
        p: [bytes(e) for e in msgspec.json.decode(m, type=list[msgspec.Raw])] for p, m in output.forwarded
    }
    assert forwarded == {p: [body for _, _, body in records] for p, records in expected.items()}
    return True


# Generated events ----------------------------------------------------------------------------
# Valid events first (every type, every optional field present or not, values across their
# ranges, every time form msgspec reads), then, half the time, one or two mutations to an edge
# value, a wrong type, a missing or extra field: both sides of every bound.

ACCOUNTS = ["acct-1", "acct-2", "b", "Z9.x:y@z-_", "acct-00042"]
safe_text = st.text(string.ascii_letters + string.digits + "-_./:", min_size=1, max_size=20)
unicode_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8)
odd_text = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=4),  # quotes, backslashes, controls: escaped by the encoder
    st.text("é€😀", min_size=120, max_size=130),
    st.text("é€😀", min_size=250, max_size=260),
    st.text("x", min_size=511, max_size=514),
)


def valid_text(max_len: int) -> st.SearchStrategy[str]:
    return st.one_of(safe_text, unicode_text, st.text("é€😀a", min_size=max_len - 2, max_size=max_len))


def valid_decimal(top: int = 10**15) -> st.SearchStrategy[Any]:
    """A quantity within bounds, as a string or a JSON number, with 0..12 decimal places."""

    def spell(whole: int, places: int, fraction: int, as_number: bool) -> Any:
        text = str(whole) if places == 0 else f"{whole}.{fraction % 10**places:0{places}d}"
        return msgspec.Raw(text.encode()) if as_number else text

    return st.builds(spell, st.integers(0, top - 1), st.integers(0, 12), st.integers(0), st.booleans())


BAD_DECIMALS: list[Any] = [
    *["-0", "-1.5", "1e3", "1E-7", "NaN", "Infinity", " 1", "1_000", ".5", "5.", "007"],
    *["0.1234567890123", "1000000000000001", "1000000000000000.5", "", "x"],
    *[None, True, 5, -5, [], {}],
]
ENVELOPE_FIELDS = ["specversion", "id", "source", "time", "subject", "datacontenttype", "dataschema"]
BAD_ENVELOPE_VALUES: list[Any] = [
    *["1.1", 1.0, None, "", "gpu.usage.v2", "text/plain", "x" * 513, "2026-02-30T00:00:00Z"],
    *["acct 1", "acct-1\n", [], {}],
]
SUBJECTS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}", fullmatch=True)
UTILIZATIONS = ["0", "0.5", "0.99", "1", "1.0", "1.000000000001", "0.000000000001"]
EXTENSIONS: list[Any] = ["00-abc-01", 1, [1, {"a": None}], {"b": [True, -1.5e3]}]


def time_text(moment: datetime, form: int) -> str:
    forms = [
        moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        moment.isoformat().replace("+00:00", "Z"),
        moment.isoformat(),
        moment.astimezone(timezone(timedelta(hours=2))).isoformat(),
        moment.astimezone(timezone(timedelta(hours=-5, minutes=-30))).isoformat(),
        moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "z",
        moment.strftime("%Y-%m-%d %H:%M:%SZ"),  # msgspec reads these; the fast path declines
        moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "1Z",
        moment.strftime("%Y-%m-%dT%H:%M:%S+0000"),
    ]
    return forms[form % len(forms)]


times = st.builds(
    time_text,
    st.integers(-35 * 86_400 - 5, 5 * 60 + 5).map(
        lambda s: NOW + timedelta(seconds=s, microseconds=s % 7 * 3)
    ),
    st.integers(0, 8),
)


def fields(cls: type) -> tuple[mi.Field, ...]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info.fields


def data_type(cls: type) -> type:
    [data] = [f for f in fields(cls) if f.name == "data"]
    assert isinstance(data.type, mi.StructType)
    return data.type.cls


def unwrap(field_type: Any) -> tuple[Any, bool]:
    nullable = isinstance(field_type, mi.UnionType)
    kind = field_type.types[0] if nullable else field_type
    while isinstance(kind, mi.Metadata):
        kind = kind.type
    return kind, nullable


def valid_value(kind: Any) -> st.SearchStrategy[Any]:
    if isinstance(kind, mi.StrType):
        return valid_text(kind.max_length or 64)
    if isinstance(kind, mi.IntType):
        return st.one_of(st.integers(kind.ge, kind.le), st.sampled_from([kind.ge, kind.le]))
    return valid_decimal()


def edges(kind: mi.IntType) -> list[Any]:
    assert kind.ge is not None and kind.le is not None
    return [kind.ge - 1, kind.le + 1, "1", 1.0, None, True, msgspec.Raw(b"-0"), msgspec.Raw(b"1e0")]


def bad_value(kind: Any) -> st.SearchStrategy[Any]:
    if isinstance(kind, mi.StrType):
        return st.one_of(odd_text, st.sampled_from([None, 5, True]))
    if isinstance(kind, mi.IntType):
        return st.sampled_from(edges(kind))
    return st.sampled_from(BAD_DECIMALS)


@st.composite
def payloads(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field in fields(cls):
        kind, nullable = unwrap(field.type)
        if not field.required and draw(st.booleans()):
            if nullable and draw(st.booleans()):
                data[field.name] = None
            continue  # left to its default
        data[field.name] = draw(valid_value(kind))
    if "vram_total_gb" in data and "vram_allocated_gb" in data and draw(st.integers(0, 5)):
        data["vram_total_gb"] = draw(valid_decimal())  # usually allocated <= total
        total = msgspec.json.decode(msgspec.json.encode(data["vram_total_gb"]), type=Decimal)
        data["vram_allocated_gb"] = str(total / draw(st.sampled_from([1, 2, 4, 8])))
    if "utilization" in data:
        data["utilization"] = draw(st.sampled_from(UTILIZATIONS))
    return data


@st.composite
def events(draw: st.DrawFn, index: int = 0) -> dict[str, Any]:
    cls = draw(st.sampled_from(EVENT_CLASSES))
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{draw(valid_text(240))}#{index}",
        "source": draw(st.sampled_from(["node-agent/eu-1", "src", "é" * 512]) | safe_text),
        "type": cls.__struct_config__.tag,
        "time": draw(times),
        "subject": draw(st.sampled_from(ACCOUNTS) | SUBJECTS),
        "data": draw(payloads(data_type(cls))),
    }
    if draw(st.booleans()):
        event["datacontenttype"] = draw(st.sampled_from([None, "application/json"]))
    if draw(st.booleans()):
        event["dataschema"] = draw(st.sampled_from([None, "", "https://tally/schemas/x"]))
    if draw(st.booleans()):
        event["traceparent"] = draw(st.sampled_from(EXTENSIONS))  # an unknown field
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # mutations
        target = draw(st.sampled_from(["envelope", "data", "data", "delete"]))
        if target == "envelope":
            name = draw(st.sampled_from([*ENVELOPE_FIELDS, "type", "data"]))
            event[name] = draw(st.sampled_from(BAD_ENVELOPE_VALUES) | odd_text)
        elif target == "delete":
            event.pop(draw(st.sampled_from(sorted(event))), None)
        elif isinstance(event.get("data"), dict):
            field = draw(st.sampled_from(fields(data_type(cls))))
            event["data"][field.name] = draw(bad_value(unwrap(field.type)[0]))
    order = draw(st.permutations(list(event)))
    return {k: event[k] for k in order}


def encode(event: dict[str, Any], spaced: bool) -> bytes:
    raw = msgspec.json.encode(event)
    if not spaced:
        return raw
    try:
        return msgspec.json.format(raw, indent=1)
    except msgspec.DecodeError:  # a raw number that is not JSON: left as it is
        return raw


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(1, 4))
    batch = draw(st.booleans()) or count > 1
    bodies = [encode(draw(events(i)), draw(st.integers(0, 4)) == 0) for i in range(count)]
    if draw(st.integers(0, 20)) == 0:  # a key twice: msgspec's rules, the Python path's call
        bodies[0] = bodies[0].replace(b'{"', b'{"id":"twice","', 1)
    value = encode_batch(bodies) if batch else bodies[0]
    return draw(st.sampled_from([value, b"  " + value + b"\n", value]))


@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_what_the_native_path_takes_it_takes_exactly_as_python_does(value: bytes) -> None:
    # In hypothesis' runs ~13% of the messages are taken and ~78% declined, the rest rejected by
    # Python alone (--hypothesis-show-statistics): every taken one is checked byte for byte.
    event("taken" if check(value) else "declined")


def loadgen_messages(batch_size: int) -> list[bytes]:
    plan = LoadPlan(events=3_000, accounts=50, seed=5, bad_fraction=0, batch_size=batch_size, run_id="native")
    return [m.value for m in generate(plan, NOW, Expected())]


@pytest.mark.parametrize("batch_size", [1, 100])
def test_the_native_path_takes_every_clean_message_of_the_load_generator(batch_size: int) -> None:
    """Tally's producers' forms (and the duplicates' reformatted copies: another key order and a
    +02:00 offset) never fall to the slow path: the bench figures rest on this."""
    values = loadgen_messages(batch_size)
    assert all(check(v, DEFAULTS) for v in values)


def test_normalized_events_are_taken_as_they_are() -> None:
    """What the meter forwards (normalized) is validated again at its account's partition."""
    core = native(DEFAULTS, partition=1)
    for value in loadgen_messages(100):
        assert core.ingest([Record(value)], 0) == 1
    forwarded = [m for _, m in core.take().forwarded]
    assert forwarded and all(check(m, DEFAULTS) for m in forwarded)


def test_bounds_that_only_the_policy_knows() -> None:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "source": "s",
        "type": "storage.usage.v1",
        "time": "2026-11-24T11:59:00Z",
        "subject": "acct-1",
        "data": {"storage_kind": "bucket", "resource_id": "r", "gb": "12.5", "duration_seconds": 60},
    }
    value = msgspec.json.encode(base)
    assert check(value)
    known = IngestPolicy(20_000, 2_000, timedelta(minutes=5), timedelta(days=35), frozenset({"acct-2"}))
    assert not check(value, known)  # unknown_account: Python's to say
    assert not check(value, IngestPolicy(20_000, len(value) - 1, timedelta(minutes=5), timedelta(days=35)))
    assert not check(msgspec.json.encode({**base, "time": "2026-11-24T12:05:01Z"}))  # too far ahead
    assert check(msgspec.json.encode({**base, "time": "2026-11-24T12:05:00Z"}))
    assert not check(b"[]") and not check(b"") and not check(b"[" + value + b",]")
    core = native()
    assert core.ingest([Record(None), Record(value)], 0) == 0  # a tombstone: declined first


def test_the_field_tables_are_the_structs() -> None:
    """native/src/event.rs spells out every field of schemas/events.py; a change to one must
    change the other (or the fast path would accept what the contract refuses)."""

    def describe(field: Any) -> tuple[str, str, bool, str]:
        nullable = isinstance(field.type, mi.UnionType)
        kind = field.type.types[0] if nullable else field.type
        while isinstance(kind, mi.Metadata):
            kind = kind.type
        if isinstance(kind, mi.StrType):
            assert kind.pattern is None
            text = f"str[{kind.min_length},{kind.max_length}]"
        elif isinstance(kind, mi.IntType):
            text = f"int[{kind.ge},{kind.le}]"
        else:
            assert isinstance(kind, mi.DecimalType)
            text = "decimal"
        default = "required" if field.required else str(field.default)
        return field.name, text, nullable, default

    structs = [(cls.__struct_config__.tag, data_type(cls)) for cls in EVENT_CLASSES]
    expected = [(tag, [describe(f) for f in fields(data)]) for tag, data in structs]
    assert tally_native.schema() == expected
    assert [f.name for f in fields(EVENT_CLASSES[0])] == ["data", *ENVELOPE_FIELDS]


def test_identity_fingerprint_and_partition_are_the_python_ones() -> None:
    for value in loadgen_messages(1)[:200]:
        expected = python(value)
        assert expected is not None
        [(partition, [(key, print_, _)])] = expected.items()
        core = native(partition=partition)  # the event's own partition: it is marked there
        assert core.ingest([Record(value)], 0) == 1
        assert core.take().marks == [(key, print_)]


def test_output_messages_are_cut_at_the_size_limit() -> None:
    """Accepted and forwarded batches stay under the limit (``cut_by_size``'s cut), in order."""
    core = native(DEFAULTS, partition=0, batch_bytes=4_000)
    values = loadgen_messages(100)
    for value in values:
        core.ingest([Record(value)], 0)
    output = core.take()
    batches = [*output.accepted, *(m for _, m in output.forwarded)]
    assert len(output.accepted) > 10 and len(output.forwarded) > 10
    assert all(len(m) <= 4_000 for m in batches)
    events = [e for m in batches for e in msgspec.json.decode(m, type=list[msgspec.Raw])]
    assert len(events) == output.accepted_count + output.forwarded_count
    for cut in (output.accepted, [m for p, m in output.forwarded if p == 1]):
        run = [bytes(e) for m in cut for e in msgspec.json.decode(m, type=list[msgspec.Raw])]
        again = list(cut_by_size(run, 4_000))
        assert [encode_batch(list(chunk)) for chunk in again] == cut  # the very same cut
