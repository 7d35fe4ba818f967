"""Topic declarations on the real broker: created once, and a run's topics deleted by prefix."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.settings import Settings
from pipeline.testing import isolated_settings
from pipeline.topics import create_topics, declared_topics, delete_topics_with_prefix


async def topic_names(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_a_runs_topics_are_created_once_and_deleted_by_its_prefix(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)  # creates the declared topics
    declared = {spec.name for spec in declared_topics(settings)}
    assert declared <= asyncio.run(topic_names(settings))
    assert {status for _, status in asyncio.run(create_topics(settings))} == {"exists"}

    deleted = asyncio.run(delete_topics_with_prefix(settings, settings.app_id))
    assert set(deleted) == declared
    # Deletion is asynchronous on the broker: the metadata forgets the topics within seconds.
    deadline = time.monotonic() + 30
    while declared & asyncio.run(topic_names(settings)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not declared & asyncio.run(topic_names(settings))
    with pytest.raises(ValueError, match="every topic"):
        asyncio.run(delete_topics_with_prefix(settings, ""))
