-- Charges may be negative: a correction that lowers a billing period's exact total (a late event
-- that withdraws a GPU session's rounding, a volume tier reached, a plan history corrected) is
-- charged as a credit, so a period's charges always add up to its total rounded once
-- (docs/PRICING.md). Amounts and platform fees become signed, in the raw table and every rollup;
-- billing_method names the credits. Each statement is idempotent (modifying a column to the type
-- it has changes nothing), so a file cut short by a crash is applied again whole.

ALTER TABLE charges MODIFY COLUMN amount_base_units Int64;
ALTER TABLE charges MODIFY COLUMN platform_fee_base_units Int64;
ALTER TABLE charges MODIFY COLUMN billing_method LowCardinality(String) MATERIALIZED multiIf(
    meter = 'api_fee', 'subscription_fee',
    amount_base_units = 0, 'subscription_included',
    amount_base_units < 0, 'credit',
    'wallet_deduction');

ALTER TABLE charges_1m MODIFY COLUMN amount_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_1m MODIFY COLUMN platform_fee_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_1h MODIFY COLUMN amount_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_1h MODIFY COLUMN platform_fee_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_1d MODIFY COLUMN amount_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_1d MODIFY COLUMN platform_fee_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_accounts_1h MODIFY COLUMN amount_base_units SimpleAggregateFunction(sum, Int64);
ALTER TABLE charges_accounts_1d MODIFY COLUMN amount_base_units SimpleAggregateFunction(sum, Int64);
