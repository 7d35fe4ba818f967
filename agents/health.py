"""Pipeline health figures for the dashboards, sampled by the analytics agent into ClickHouse.

Every ``analytics_sample_interval`` (15 s by default), one row per (consumer group, topic) into
``consumer_lag`` and one row per account into ``account_balances`` (prepaid balance and
low-balance threshold, from Postgres, the book of record). Samples are figures for panels, not
records: a failed sample is logged and the next one taken, and nothing stops the agent for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import Engine, create_engine

from agents.config import STAGES, AgentSettings
from sinks.clickhouse import ClickHouseSink
from sinks.postgres import customer_balances, sqlalchemy_url

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()


def stage_groups(settings: AgentSettings) -> dict[str, list[str]]:
    """Every stage's consumer group, with the topics it reads."""
    inputs = {
        "meter": [settings.topic_raw],
        "ledger": [settings.topic_charges],
        "analytics": [settings.topic_accepted, settings.topic_charges, settings.topic_rejected],
    }
    return {settings.group_id(stage): inputs[stage] for stage in STAGES}


class HealthSampler:
    def __init__(
        self,
        settings: AgentSettings,
        sink: ClickHouseSink,
        admin: AIOKafkaAdminClient,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.admin = admin
        self.consumer = consumer

    async def run(self) -> None:
        interval = self.settings.analytics_sample_interval.total_seconds()
        engine = create_engine(sqlalchemy_url(self.settings), pool_size=1, max_overflow=0)
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    lag = await self.lag_rows()
                    balances = await asyncio.to_thread(balance_rows, engine)
                    for table, rows in (("consumer_lag", lag), ("account_balances", balances)):
                        if rows:
                            token = f"{table}:{time.time()}"
                            await asyncio.to_thread(self.sink.insert, table, [_json.encode(rows)], token)
                except Exception as exc:  # dashboard figures: never stop the agent for them
                    log.warning("analytics: sampling lag and balances failed: %r", exc)
        finally:
            engine.dispose()

    async def lag_rows(self) -> list[dict[str, object]]:
        """One row per (group, topic): end offsets minus committed offsets, summed over partitions.
        Offsets count a transaction's commit marker too, so a caught-up partition reads 0 or 1."""
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        rows = []
        for group, topics in stage_groups(self.settings).items():
            committed = await self.admin.list_consumer_group_offsets(group)
            # The partitions the group has committed on (a group that never committed has no lag
            # to show yet).
            partitions = sorted(tp for tp in committed if tp.topic in topics)
            if not partitions:
                continue
            ends = await self.consumer.end_offsets(partitions)
            starts = await self.consumer.beginning_offsets(partitions)
            for topic in topics:
                lag = 0
                for tp in partitions:
                    if tp.topic == topic:
                        done = committed[tp]
                        position = done.offset if done.offset >= 0 else starts[tp]
                        lag += max(0, ends[tp] - position)
                rows.append({"time": now, "consumer_group": group, "topic": topic, "lag": lag})
        return rows


def balance_rows(engine: Engine) -> list[dict[str, object]]:
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    return [
        {"time": now, "account": account, "balance_base_units": balance, "low_balance_threshold": threshold}
        for account, balance, threshold in customer_balances(engine)
    ]
