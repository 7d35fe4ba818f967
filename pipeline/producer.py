"""The async producer client other services use to publish usage to ``usage.raw``.

Events are grouped per account and sent as CloudEvents batches (the fast shape: bench/ingest),
one Kafka message per account and chunk, keyed by the account, so Kafka's default partitioner puts an
account's messages on one partition in order. ``send_events`` returns only once every message
is acknowledged by all in-sync replicas (``acks=all``, idempotent producer: a retry never
duplicates a message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from pipeline.settings import Settings
from schemas.events import UsageEvent, cut_by_size, encode_batch, encoder
from schemas.rejections import MAX_RAW_MESSAGE_BYTES


class TallyProducer:
    def __init__(self, settings: Settings, *, linger_ms: int = 10) -> None:
        self.topic = settings.topic_raw
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=f"{settings.app_id}-producer",
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=1024 * 1024,
            max_request_size=MAX_RAW_MESSAGE_BYTES,
        )

    async def __aenter__(self) -> TallyProducer:
        await self._producer.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._producer.stop()

    async def send_events(self, events: Iterable[UsageEvent]) -> int:
        """Publish events batched per account; return the number of Kafka messages sent."""
        per_account: dict[str, list[bytes]] = {}
        for event in events:
            per_account.setdefault(event.subject, []).append(encoder.encode(event))
        messages: list[tuple[bytes, bytes]] = []
        for account, encoded in per_account.items():
            key = account.encode()
            messages.extend((key, encode_batch(chunk)) for chunk in cut_by_size(encoded))
        await self.send_raw(messages)
        return len(messages)

    async def send_raw(self, messages: Sequence[tuple[bytes | None, bytes]]) -> list[RecordMetadata]:
        """Publish pre-encoded (key, value) messages as they are; wait for every acknowledgement."""
        futures = [await self._producer.send(self.topic, value, key=key) for key, value in messages]
        return list(await asyncio.gather(*futures))
