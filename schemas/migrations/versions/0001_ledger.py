"""Ledger: accounts, plans, price-book versions, charges, double-entry entries, balances, audit log."""

from __future__ import annotations

from alembic import op

revision = "0001_ledger"
down_revision = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE plans (
        name        text PRIMARY KEY,
        price_book  text NOT NULL,
        api_tier    text,
        description text NOT NULL DEFAULT ''
    );
    CREATE TABLE accounts (
        account_id  text PRIMARY KEY,
        plan        text REFERENCES plans (name),
        created_at  timestamptz NOT NULL DEFAULT now(),
        -- A low-balance event fires when the balance crosses below this (base units).
        low_balance_threshold bigint NOT NULL DEFAULT 0 CHECK (low_balance_threshold >= 0)
    );
    CREATE TABLE price_book_versions (
        book            text NOT NULL,
        effective_from  timestamptz NOT NULL,
        content         jsonb NOT NULL,
        loaded_at       timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (book, effective_from)
    );
    -- One row per charge line; the primary key makes every write idempotent.
    CREATE TABLE charges (
        charge_id        uuid PRIMARY KEY,
        account_id       text NOT NULL,
        meter            text NOT NULL,
        dimensions       jsonb NOT NULL,
        window_start     timestamptz NOT NULL,
        revision         integer NOT NULL CHECK (revision >= 0),
        quantity         numeric NOT NULL,
        unit             text NOT NULL,
        unit_price       numeric NOT NULL,
        amount_base_units bigint NOT NULL CHECK (amount_base_units >= 0),
        price_version    text NOT NULL,
        provider_id      text,
        platform_fee_base_units bigint NOT NULL DEFAULT 0 CHECK (platform_fee_base_units >= 0),
        recorded_at      timestamptz NOT NULL DEFAULT now()
    );
    -- Statements and totals read charges per account over time.
    CREATE INDEX charges_account_window ON charges (account_id, window_start);
    -- Double entry: every charge writes debits and credits of equal sums, in the charge's transaction.
    CREATE TABLE ledger_entries (
        entry_id     bigserial PRIMARY KEY,
        charge_id    uuid NOT NULL REFERENCES charges (charge_id),
        ledger_account text NOT NULL,          -- customer:<id>, provider:<id>, platform
        side         text NOT NULL CHECK (side IN ('debit', 'credit')),
        amount_base_units bigint NOT NULL CHECK (amount_base_units > 0),
        recorded_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX ledger_entries_charge ON ledger_entries (charge_id);
    CREATE INDEX ledger_entries_account ON ledger_entries (ledger_account);
    -- Balance per ledger account: credits minus debits (a customer's prepaid balance).
    CREATE TABLE balances (
        ledger_account    text PRIMARY KEY,
        balance_base_units bigint NOT NULL,
        updated_at        timestamptz NOT NULL DEFAULT now()
    );
    -- Append-only audit log: updates and deletes are refused by the trigger below.
    CREATE TABLE audit_log (
        audit_id  bigserial PRIMARY KEY,
        at        timestamptz NOT NULL DEFAULT now(),
        actor     text NOT NULL,
        action    text NOT NULL,
        subject   text NOT NULL,
        details   jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only';
    END $$;
    CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE audit_log; DROP FUNCTION audit_log_append_only();
    DROP TABLE balances; DROP TABLE ledger_entries; DROP TABLE charges;
    DROP TABLE price_book_versions; DROP TABLE accounts; DROP TABLE plans;
    """)
