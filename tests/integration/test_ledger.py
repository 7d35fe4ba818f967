"""The Postgres ledger on a real server: idempotent on charge_id, debits equal credits."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
import pytest
from aiokafka.structs import ConsumerRecord
from sqlalchemy import text

from agents.ledger import LedgerTask
from pipeline.settings import load_settings
from pipeline.testing import isolated_database
from schemas.charges import Charge, charge_id, charges_encoder
from sinks.postgres import LedgerWriter


def charges(count: int, seed: int = 1, first_minute: int = 0) -> list[Charge]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 24, tzinfo=UTC)
    out = []
    for i in range(count):
        account = f"acct-{rng.randint(0, 19):05d}"
        window = start + timedelta(minutes=first_minute + i)
        provider = f"prov-{rng.randint(1, 3):02d}" if i % 2 else None
        amount = rng.randint(0, 5_000_000)
        out.append(
            Charge(
                charge_id=charge_id(account, "gpu", {"gpu_model": "a100"}, window, 0),
                account=account,
                meter="gpu",
                dimensions={"gpu_model": "a100"},
                window_start=window,
                quantity="0.0166666",
                unit="gpu_hour",
                unit_price="2.5",
                amount_base_units=amount,
                price_version="2026-01-01T00:00:00Z",
                provider_id=provider,
                platform_fee_base_units=amount * 5 // 100 if provider else 0,
            )
        )
    return out


def test_charges_ledger_and_balances_are_written_once_and_balance(tmp_path: Path) -> None:
    settings = isolated_database(load_settings(data_dir=tmp_path))
    writer = LedgerWriter(settings)
    try:
        batch = charges(10_000)  # 130,000 values: more than one statement may carry
        assert writer.write(batch) == 10_000
        assert writer.write(batch) == 0  # a replay changes nothing
        assert (
            writer.write(batch[:10] + charges(5, seed=2, first_minute=100_000)) == 5
        )  # a mix: only the new ones count
        with writer.engine.connect() as db:
            stored = db.execute(
                text("SELECT count(*), coalesce(sum(amount_base_units), 0) FROM charges")
            ).one()
            debits, credits = db.execute(
                text(
                    "SELECT coalesce(sum(amount_base_units) FILTER (WHERE side = 'debit'), 0),"
                    " coalesce(sum(amount_base_units) FILTER (WHERE side = 'credit'), 0)"
                    " FROM ledger_entries"
                )
            ).one()
            balances = db.execute(
                text("SELECT coalesce(sum(balance_base_units), 0) FROM balances")
            ).scalar_one()
            customer = db.execute(
                text("SELECT balance_base_units FROM balances WHERE ledger_account = 'customer:acct-00000'")
            ).scalar_one()
            platform = db.execute(
                text("SELECT balance_base_units FROM balances WHERE ledger_account = 'platform'")
            ).scalar_one()
        every = batch + charges(5, seed=2, first_minute=100_000)
        assert stored == (10_005, sum(c.amount_base_units for c in every))
        assert debits == credits == stored[1]
        assert balances == 0  # double entry: the balances of all ledger accounts cancel out
        assert customer == -sum(c.amount_base_units for c in every if c.account == "acct-00000")
        assert platform == sum(
            c.platform_fee_base_units if c.provider_id else c.amount_base_units for c in every
        )
    finally:
        writer.close()


def test_the_audit_log_is_append_only(tmp_path: Path) -> None:
    settings = isolated_database(load_settings(data_dir=tmp_path))
    with psycopg.connect(settings.postgres_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO audit_log (actor, action, subject) VALUES (%s, %s, %s)", ("ops", "deposit", "acct-1")
        )
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            db.execute("UPDATE audit_log SET actor = %s", ("someone else",))
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            db.execute("DELETE FROM audit_log")
        assert db.execute("SELECT count(*) FROM audit_log").fetchone() == (1,)


def test_charge_ids_are_deterministic_and_revisions_differ() -> None:
    window = datetime(2026, 11, 24, 10, tzinfo=UTC)
    first = charge_id("acct-1", "gpu", {"gpu_model": "a100", "region": "eu"}, window, 0)
    assert first == charge_id("acct-1", "gpu", {"region": "eu", "gpu_model": "a100"}, window, 0)
    assert first != charge_id("acct-1", "gpu", {"gpu_model": "a100", "region": "eu"}, window, 1)
    assert first.version == 5


def test_the_ledger_stage_dead_letters_what_breaks_the_contract_and_writes_the_rest(tmp_path: Path) -> None:
    """Charges from a foreign producer: undecodable, a credit whose fee is a debit, a fee above its
    charge, or text Postgres refuses (NUL) - each such message is dead-lettered with a reason,
    never raised, and the good ones in the same poll are written."""
    settings = isolated_database(load_settings(data_dir=tmp_path))
    good = charges(3, seed=7)
    nul = [msgspec.structs.replace(charges(1, seed=8, first_minute=500)[0], account="acct-\x00")]
    # A credit (a negative charge) is valid, but not with a fee of the other sign.
    with_provider = charges(2, seed=9, first_minute=600)[1]
    assert with_provider.provider_id is not None and with_provider.platform_fee_base_units > 0
    negative = msgspec.json.encode([with_provider]).replace(
        b'"amount_base_units":', b'"amount_base_units":-', 1
    )
    above = [
        msgspec.structs.replace(
            good[0], platform_fee_base_units=good[0].amount_base_units + 1, provider_id="p"
        )
    ]
    values = [
        charges_encoder.encode(good),
        charges_encoder.encode(nul),
        negative,
        charges_encoder.encode(above),
        b"not json",
    ]
    records = [
        ConsumerRecord("charges", 0, offset, 0, 0, None, value, None, 0, len(value), ())
        for offset, value in enumerate(values)
    ]
    writer = LedgerWriter(settings)
    try:
        task = LedgerTask(settings, 0, writer)
        outcome = asyncio.run(task.process(records, datetime.now(UTC)))
        assert outcome.counters["new"] == 3
        assert outcome.counters["rejected.schema_violation"] == 4
        origins = sorted(dict(m.headers)["tally.origin"] for m in outcome.messages)
        assert origins == [f"{settings.topic_charges}/0/{i}".encode() for i in (1, 2, 3, 4)]
        assert [m.value for m in outcome.messages if dict(m.headers)["tally.origin"].endswith(b"/1")] == [
            values[1]
        ]
        with writer.engine.connect() as db:
            assert db.execute(text("SELECT count(*) FROM charges")).scalar_one() == 3
    finally:
        writer.close()


def test_dimensions_reach_jsonb_exactly_whatever_their_characters(tmp_path: Path) -> None:
    """Dimensions travel to COPY as JSON text: tabs, newlines, backslashes, quotes and non-ASCII
    in keys or values must come out of the jsonb column as they went in."""
    settings = isolated_database(load_settings(data_dir=tmp_path))
    writer = LedgerWriter(settings)
    awkward = {"model\tname": 'a "b" \\ c\nd', "région": "\\N", "empty": "", "x\\y": "\u2028"}
    (base,) = charges(1)
    charge = msgspec.structs.replace(
        base,
        dimensions=awkward,
        charge_id=charge_id(base.account, "gpu", awkward, base.window_start, 0),
    )
    try:
        assert writer.write([charge]) == 1
        with writer.engine.connect() as db:
            stored = db.execute(
                text("SELECT dimensions FROM charges WHERE charge_id = :id"), {"id": charge.charge_id}
            ).scalar_one()
    finally:
        writer.close()
    assert stored == awkward


def test_a_credit_reverses_the_sides_of_its_entries_and_balances_stay_double(tmp_path: Path) -> None:
    """A negative charge (a correction lowering its period's total) credits the customer and
    debits the provider and the platform by its split; every balance still sums to zero."""
    settings = isolated_database(load_settings(data_dir=tmp_path))
    writer = LedgerWriter(settings)
    charge = msgspec.structs.replace(
        charges(2, seed=11)[1], amount_base_units=10_000, platform_fee_base_units=500
    )
    credit = msgspec.structs.replace(
        charge,
        charge_id=charge_id(charge.account, "gpu", charge.dimensions, charge.window_start, 1),
        revision=1,
        amount_base_units=-4_000,
        platform_fee_base_units=-200,
    )
    try:
        assert writer.write([charge, credit]) == 2
        with writer.engine.connect() as db:
            entries = sorted(
                db.execute(
                    text(
                        "SELECT ledger_account, side, amount_base_units FROM ledger_entries"
                        " WHERE charge_id = :id"
                    ),
                    {"id": credit.charge_id},
                ).all()
            )
            rows = db.execute(text("SELECT ledger_account, balance_base_units FROM balances")).all()
            balances: dict[str, int] = {account: int(balance) for account, balance in rows}
    finally:
        writer.close()
    assert entries == [
        (f"customer:{charge.account}", "credit", 4_000),
        ("platform", "debit", 200),
        (f"provider:{charge.provider_id}", "debit", 3_800),
    ]
    assert balances == {
        f"customer:{charge.account}": -6_000,
        f"provider:{charge.provider_id}": 9_500 - 3_800,
        "platform": 500 - 200,
    }
