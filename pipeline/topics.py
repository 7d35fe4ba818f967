"""Topic declarations (docs/ARCHITECTURE.md, "Following one event") and ``tally topics create``.

Every topic has the same partition count: producers key and ingest routes by
``murmur2(account) % partitions``, and each keyed stage writes its output to the same partition
number it read, so one account's events stay on one partition number all the way down.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from agents.meter import meter_changelog_topic
from pipeline.settings import Settings
from schemas.rejections import MAX_DEAD_LETTER_BYTES, MAX_RAW_MESSAGE_BYTES

DAY_MS = 86_400_000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    purpose: str
    config: dict[str, str] = field(default_factory=dict)


def declared_topics(settings: Settings) -> list[TopicSpec]:
    horizon_ms = int(settings.dedupe_horizon.total_seconds() * 1000)
    return [
        TopicSpec(
            settings.topic_raw,
            "raw usage from producers, any key, single or batch",
            {"retention.ms": str(7 * DAY_MS), "max.message.bytes": str(MAX_RAW_MESSAGE_BYTES)},
        ),
        TopicSpec(
            settings.topic_accepted,
            "deduplicated events, the input of metering and analytics",
            {"retention.ms": str(horizon_ms + DAY_MS)},
        ),
        TopicSpec(
            settings.topic_rejected,
            "dead letters: original bytes + reason headers",
            {"retention.ms": str(horizon_ms + DAY_MS), "max.message.bytes": str(MAX_DEAD_LETTER_BYTES)},
        ),
        TopicSpec(
            settings.topic_charges,
            "rated charge lines, batched per partition of murmur2(account)",
            {"retention.ms": str(horizon_ms + DAY_MS)},
        ),
        # One record per commit holding that commit's marks. Keys are not per mark, so compaction
        # would not shrink it; marks older than the horizon are useless, so plain time retention.
        TopicSpec(
            meter_changelog_topic(settings),
            "meter state (dedupe marks, windows, period usage), one record per transaction",
            {"retention.ms": str(horizon_ms + DAY_MS), "cleanup.policy": "delete"},
        ),
    ]


async def create_topics(settings: Settings) -> list[tuple[str, str]]:
    """Create the declared topics that are missing; return (name, "created" | "exists")."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        specs = declared_topics(settings)
        missing = [
            NewTopic(s.name, settings.partitions, settings.replication_factor, topic_configs=s.config)
            for s in specs
            if s.name not in existing
        ]
        if missing:
            # Another process may create them between our list and create: same outcome.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        created = {t.name for t in missing}
        return [(s.name, "created" if s.name in created else "exists") for s in specs]
    finally:
        await admin.close()


async def delete_topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a bench's or test's run id); return
    their names. For throwaway runs only: a million-event bench leaves ~5 GB behind otherwise."""
    if not prefix:
        raise ValueError("an empty prefix would delete every topic")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()
