-- Analytics tables. Applied by `tally db upgrade` (sinks/clickhouse.py: each file once,
-- in name order, statements split on ';' at a line end). The same SQL runs on chdb and a server.
--
-- Idempotency: every MergeTree here keeps the hashes of its last 10,000 inserted blocks
-- (`non_replicated_deduplication_window`), and the analytics agent gives each batch an
-- `insert_deduplication_token` made of its Kafka coordinates (topic, partition, first and last
-- offset). A retried batch is dropped by the raw table AND by every rollup: a materialized view
-- pushes a retried block into its target unless the target has the window too (measured with
-- chdb 4.4 / engine 26.9). The window counts blocks, and an insert makes a block per partition it
-- touches (a batch with late events spans several days' minute partitions): at 3 inserts per
-- second per table (6 partitions, 2 s batches) and up to 3 blocks each, 10,000 blocks keep about
-- 18 minutes; a replay follows its crash or rebalance within seconds, and during a ClickHouse
-- outage nothing is inserted, so the window does not move.

-- One row per accepted usage event (topic usage.accepted), as ingest normalized it. The `data`
-- tuple holds the fields analytics reads (rollups, stats, the per-account drill-down), of every
-- event type: JSONEachRow parses each event's data object once into it, skipping the other keys
-- and defaulting missing ones (one JSONExtract per column parsed the JSON once per column).
-- Keeping all 25 fields of every type cost ~25% of the sink's rows/s here (327,991 -> 427,198
-- rows/s into this table alone, medians of 12 inserts): the whole event stays in usage.accepted
-- for the correction horizon + 1 day, and a field analytics needs later is a new tuple element.
CREATE TABLE IF NOT EXISTS usage_events
(
    id String,
    source String,
    type LowCardinality(String),
    time DateTime64(6, 'UTC'),
    subject String,
    data Tuple(
        provider_id LowCardinality(String),
        gpu_model LowCardinality(String),
        gpu_count UInt16,
        interval_seconds UInt32,
        endpoint String,
        request_count UInt64,
        tokens_in UInt64,
        tokens_out UInt64,
        product_id LowCardinality(String),
        service_type LowCardinality(String),
        status UInt16,
        storage_kind LowCardinality(String),
        gb Decimal(38, 9),
        duration_seconds UInt32
    ),
    -- Service types: API requests name theirs; the other types map to one each.
    service LowCardinality(String) MATERIALIZED multiIf(
        type = 'api.request.v1', data.service_type,
        type = 'gpu.usage.v1', 'gpu_rental',
        type = 'storage.usage.v1', 'storage',
        'compute'),
    gpu_seconds UInt64 MATERIALIZED if(type = 'gpu.usage.v1', data.interval_seconds * greatest(data.gpu_count, 1), 0),
    gb_seconds Decimal(38, 9) MATERIALIZED if(type = 'storage.usage.v1', data.gb * data.duration_seconds, 0),
    inserted_at DateTime('UTC') DEFAULT now()
)
ENGINE = MergeTree
-- Monthly partitions: the 35-day correction horizon keeps writes in the last two, and retention
-- drops whole months.
PARTITION BY toYYYYMM(time)
-- Serves the drill-down by account (`tally stats usage --account`, the usage aggregations
-- by account and service type): WHERE subject = ? AND time BETWEEN ? reads one account's granules
-- only (1 in ~1,000 accounts' rows), ordered by type so a service filter narrows further.
-- Dashboards never read this table: they read the rollups below.
ORDER BY (subject, type, time)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per charge (topic charges), the same records Postgres' ledger holds.
CREATE TABLE IF NOT EXISTS charges
(
    charge_id UUID,
    account String,
    meter LowCardinality(String),
    dimensions Map(LowCardinality(String), String),
    window_start DateTime('UTC'),
    revision UInt32,
    quantity Decimal(38, 12),
    unit LowCardinality(String),
    unit_price Decimal(38, 12),
    amount_base_units UInt64,
    price_version LowCardinality(String),
    provider_id Nullable(String),
    platform_fee_base_units UInt64,
    rated_at Nullable(DateTime64(6, 'UTC')),
    service LowCardinality(String) MATERIALIZED multiIf(
        meter = 'gpu', 'gpu_rental',
        startsWith(meter, 'storage:'), 'storage',
        startsWith(meter, 'compute:'), 'compute',
        startsWith(meter, 'product:'), 'model_inference',
        'api_gateway'),
    -- Billing methods, as Tally bills: the API tier's fee is the subscription; usage
    -- inside an included quota is charged 0 (subscription_included); the rest is deducted from
    -- the prepaid balance (wallet_deduction).
    billing_method LowCardinality(String) MATERIALIZED multiIf(
        meter = 'api_fee', 'subscription_fee',
        amount_base_units = 0, 'subscription_included',
        'wallet_deduction'),
    gpu_model LowCardinality(String) MATERIALIZED dimensions['gpu_model'],
    product_id LowCardinality(String) MATERIALIZED if(startsWith(meter, 'product:'), substring(meter, 9), ''),
    tier LowCardinality(String) MATERIALIZED dimensions['tier'],
    inserted_at DateTime('UTC') DEFAULT now()
)
ENGINE = MergeTree
-- Monthly partitions, as usage_events: `tally reconcile` over a period prunes to its months.
PARTITION BY toYYYYMM(window_start)
-- Serves one account's charges (WHERE account = ? AND window_start in a range reads that
-- account's granules only, in time order) and `tally reconcile`'s sum per account and day, which
-- reads the period's months in key order. charge_id last makes the key unique per charge.
ORDER BY (account, window_start, meter, charge_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Rollups. Two families, because their keys differ by three orders of magnitude in cardinality:
-- - by dimension (usage_1m/1h/1d, charges_1m/1h/1d): no account in the key. Every dashboard panel
--   but "top accounts" groups by bucket and a dimension (service, GPU model, provider, endpoint,
--   tier), so these rows are what panels read: with the load generator's mix ~300 rows per minute
--   whatever the number of accounts, where a key with the account had ~1 row per event at 1,000
--   accounts (bench/analytics: usage_1d held 827,558 rows for 1,000,000 events).
-- - by account (usage_accounts_1d, charges_accounts_1h/1d): the account and the service only, for
--   top accounts, reconcile and the per-account stats. No per-account minute rollup: at
--   1,000 accounts it would hold about a row per event, a second copy of the raw table, whose
--   ORDER BY (subject, type, time) already serves one account's minutes.
-- Only the minute rollups and the per-account ones read raw rows; hour and day rollups cascade
-- from the finer grain's output block (already summed). Every key puts the bucket first: each
-- query reads a time range (a panel's $__timeFilter, a stats period), so the range is one
-- contiguous slice of the table. Panels pick the coarsest grain that still gives their range
-- enough points (minute up to 6 h, hour up to 3 days, day beyond): a 30-day panel reads 30 day
-- rows per dimension instead of 43,200 minute rows.
CREATE TABLE IF NOT EXISTS usage_1m
(
    bucket DateTime('UTC'),
    type LowCardinality(String),
    service LowCardinality(String),
    gpu_model LowCardinality(String),
    provider_id LowCardinality(String),
    product_id LowCardinality(String),
    endpoint String,
    storage_kind LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64),
    requests SimpleAggregateFunction(sum, UInt64),
    error_requests SimpleAggregateFunction(sum, UInt64),
    tokens SimpleAggregateFunction(sum, UInt64),
    gpu_seconds SimpleAggregateFunction(sum, UInt64),
    gb_seconds SimpleAggregateFunction(sum, Decimal(38, 9))
)
ENGINE = AggregatingMergeTree
-- Daily partitions: minute rows are kept for days, not months, and are dropped a day at a time.
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_1h AS usage_1m
ENGINE = AggregatingMergeTree
-- Monthly partitions: a panel's hour range (up to 3 days) touches one or two.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_1d AS usage_1m
ENGINE = AggregatingMergeTree
-- Yearly partitions: day rows are few (4,690 for 10,000,000 events over 30 days in bench/analytics).
PARTITION BY toYear(bucket)
ORDER BY (bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_1m_mv TO usage_1m AS
SELECT
    toStartOfMinute(time) AS bucket,
    type,
    service,
    data.gpu_model AS gpu_model,
    data.provider_id AS provider_id,
    data.product_id AS product_id,
    data.endpoint AS endpoint,
    data.storage_kind AS storage_kind,
    count() AS events,
    sum(data.request_count) AS requests,
    sumIf(data.request_count, data.status >= 400) AS error_requests,
    sum(data.tokens_in + data.tokens_out) AS tokens,
    sum(gpu_seconds) AS gpu_seconds,
    sum(gb_seconds) AS gb_seconds
FROM usage_events
GROUP BY bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_1h_mv TO usage_1h AS
SELECT
    toStartOfHour(bucket) AS bucket,
    type, service, gpu_model, provider_id, product_id, endpoint, storage_kind,
    sum(events) AS events,
    sum(requests) AS requests,
    sum(error_requests) AS error_requests,
    sum(tokens) AS tokens,
    sum(gpu_seconds) AS gpu_seconds,
    sum(gb_seconds) AS gb_seconds
FROM usage_1m
GROUP BY bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_1d_mv TO usage_1d AS
SELECT
    toStartOfDay(bucket) AS bucket,
    type, service, gpu_model, provider_id, product_id, endpoint, storage_kind,
    sum(events) AS events,
    sum(requests) AS requests,
    sum(error_requests) AS error_requests,
    sum(tokens) AS tokens,
    sum(gpu_seconds) AS gpu_seconds,
    sum(gb_seconds) AS gb_seconds
FROM usage_1h
GROUP BY bucket, type, service, gpu_model, provider_id, product_id, endpoint, storage_kind;

-- Usage per account, service and event type per day: the usage aggregations and active
-- accounts (`tally stats`).
CREATE TABLE IF NOT EXISTS usage_accounts_1d
(
    bucket DateTime('UTC'),
    account String,
    service LowCardinality(String),
    type LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64),
    requests SimpleAggregateFunction(sum, UInt64),
    error_requests SimpleAggregateFunction(sum, UInt64),
    tokens SimpleAggregateFunction(sum, UInt64),
    gpu_seconds SimpleAggregateFunction(sum, UInt64),
    gb_seconds SimpleAggregateFunction(sum, Decimal(38, 9))
)
ENGINE = AggregatingMergeTree
-- Monthly partitions: a stats period (days) touches one or two. ORDER BY (bucket, account, ...): a
-- period is a contiguous slice, grouped by account and service inside it.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, account, service, type)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_accounts_1d_mv TO usage_accounts_1d AS
SELECT
    toStartOfDay(time) AS bucket,
    subject AS account,
    service,
    type,
    count() AS events,
    sum(data.request_count) AS requests,
    sumIf(data.request_count, data.status >= 400) AS error_requests,
    sum(data.tokens_in + data.tokens_out) AS tokens,
    sum(gpu_seconds) AS gpu_seconds,
    sum(gb_seconds) AS gb_seconds
FROM usage_events
GROUP BY bucket, account, service, type;

-- Charge rollups, the same grains and families, by window start: the revenue a window earned
-- lands in that window's bucket, adjustments (later revisions) included.
CREATE TABLE IF NOT EXISTS charges_1m
(
    bucket DateTime('UTC'),
    meter LowCardinality(String),
    service LowCardinality(String),
    billing_method LowCardinality(String),
    gpu_model LowCardinality(String),
    provider_id String,
    product_id LowCardinality(String),
    tier LowCardinality(String),
    charges SimpleAggregateFunction(sum, UInt64),
    adjustments SimpleAggregateFunction(sum, UInt64),  -- charges of a revision > 0 (late usage)
    quantity SimpleAggregateFunction(sum, Decimal(38, 12)),
    amount_base_units SimpleAggregateFunction(sum, UInt64),
    platform_fee_base_units SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
-- Daily partitions, as usage_1m.
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS charges_1h AS charges_1m
ENGINE = AggregatingMergeTree
-- Monthly partitions: a panel's hour range touches one or two.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS charges_1d AS charges_1m
ENGINE = AggregatingMergeTree
-- Yearly partitions: day rows are few (775 for 1,000,000 charges over 30 days in bench/analytics).
PARTITION BY toYear(bucket)
ORDER BY (bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS charges_1m_mv TO charges_1m AS
SELECT
    toStartOfMinute(window_start) AS bucket,
    meter, service, billing_method, gpu_model,
    ifNull(provider_id, '') AS provider_id,
    product_id, tier,
    count() AS charges,
    countIf(revision > 0) AS adjustments,
    sum(quantity) AS quantity,
    sum(amount_base_units) AS amount_base_units,
    sum(platform_fee_base_units) AS platform_fee_base_units
FROM charges
GROUP BY bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS charges_1h_mv TO charges_1h AS
SELECT
    toStartOfHour(bucket) AS bucket,
    meter, service, billing_method, gpu_model, provider_id, product_id, tier,
    sum(charges) AS charges,
    sum(adjustments) AS adjustments,
    sum(quantity) AS quantity,
    sum(amount_base_units) AS amount_base_units,
    sum(platform_fee_base_units) AS platform_fee_base_units
FROM charges_1m
GROUP BY bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS charges_1d_mv TO charges_1d AS
SELECT
    toStartOfDay(bucket) AS bucket,
    meter, service, billing_method, gpu_model, provider_id, product_id, tier,
    sum(charges) AS charges,
    sum(adjustments) AS adjustments,
    sum(quantity) AS quantity,
    sum(amount_base_units) AS amount_base_units,
    sum(platform_fee_base_units) AS platform_fee_base_units
FROM charges_1h
GROUP BY bucket, meter, service, billing_method, gpu_model, provider_id, product_id, tier;

-- Charges per account and service, hourly (the top-accounts panel up to 3 days) and daily (top
-- accounts beyond, `tally reconcile` per account and day against Postgres, per-account stats).
CREATE TABLE IF NOT EXISTS charges_accounts_1h
(
    bucket DateTime('UTC'),
    account String,
    service LowCardinality(String),
    charges SimpleAggregateFunction(sum, UInt64),
    amount_base_units SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
-- Monthly partitions: a stats period or a panel range touches one or two. ORDER BY (bucket, account,
-- service): top accounts over a range, and one account's days in reconcile and stats.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, account, service)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS charges_accounts_1d AS charges_accounts_1h
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, account, service)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS charges_accounts_1h_mv TO charges_accounts_1h AS
SELECT
    toStartOfHour(window_start) AS bucket, account, service,
    count() AS charges,
    sum(amount_base_units) AS amount_base_units
FROM charges
GROUP BY bucket, account, service;

CREATE MATERIALIZED VIEW IF NOT EXISTS charges_accounts_1d_mv TO charges_accounts_1d AS
SELECT
    toStartOfDay(bucket) AS bucket, account, service,
    sum(charges) AS charges,
    sum(amount_base_units) AS amount_base_units
FROM charges_accounts_1h
GROUP BY bucket, account, service;

-- Pipeline health -----------------------------------------------------------------------------

-- One row per dead letter (topic usage.rejected): the reason and where it came from, from the
-- record's headers (schemas/rejections.py); the original bytes stay in Kafka.
CREATE TABLE IF NOT EXISTS rejections
(
    time DateTime64(3, 'UTC'),
    reason LowCardinality(String),
    stage LowCardinality(String),
    origin String,
    detail String,
    size_bytes UInt32
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
-- Serves "rejects by reason" over a time range, and a drill-down into one reason's details.
ORDER BY (time, reason)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS rejections_1m
(
    bucket DateTime('UTC'),
    reason LowCardinality(String),
    stage LowCardinality(String),
    rejections SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
-- Monthly partitions and ORDER BY (bucket, reason, stage): the rejects-by-reason panel reads a time range.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, reason, stage)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS rejections_1m_mv TO rejections_1m AS
SELECT toStartOfMinute(time) AS bucket, reason, stage, count() AS rejections
FROM rejections
GROUP BY bucket, reason, stage;

-- Accepted events per minute of processing time (when the analytics agent wrote them), not of
-- event time: the pipeline's throughput, whatever the events' own times.
CREATE TABLE IF NOT EXISTS accepted_1m
(
    bucket DateTime('UTC'),
    type LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
-- Monthly partitions and ORDER BY (bucket, type): the accepted-per-minute panel reads a time range.
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, type)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS accepted_1m_mv TO accepted_1m AS
SELECT toStartOfMinute(inserted_at) AS bucket, type, count() AS events
FROM usage_events
GROUP BY bucket, type;

-- Consumer lag per group and topic, sampled by the analytics agent (every 15 s by default).
CREATE TABLE IF NOT EXISTS consumer_lag
(
    time DateTime('UTC'),
    consumer_group LowCardinality(String),
    topic LowCardinality(String),
    lag UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
-- Serves the lag panel: the last hours of every group, in time order.
ORDER BY (time, consumer_group, topic)
TTL time + INTERVAL 30 DAY;

-- Prepaid balances and low-balance thresholds, sampled from Postgres (the book of record) by the
-- analytics agent with the consumer lag: the "accounts near or below their threshold" panel.
CREATE TABLE IF NOT EXISTS account_balances
(
    time DateTime('UTC'),
    account String,
    balance_base_units Int64,
    low_balance_threshold UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
-- Serves the panel's "latest sample per account": the last minutes of samples, by time.
ORDER BY (time, account)
TTL time + INTERVAL 30 DAY;
