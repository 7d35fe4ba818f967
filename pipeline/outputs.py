"""Reading what the pipeline wrote, as a read-committed consumer sees it.

One way to count outputs, used by ``tally demo``, the integration tests and the benches: take the
end offsets of ``usage.accepted`` and ``usage.rejected`` before a run (``snapshot``), then read from
there (``OutputReader.read_until``), counting accepted events, their identities, and dead letters
by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.ingest import Partitioner
from pipeline.settings import Settings
from schemas.events import batch_splitter, identity_decoder
from schemas.rejections import reason_of


@dataclass
class Outputs:
    accepted: int = 0
    identities: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    # Accepted events found on a partition other than murmur2(subject)'s: routing must make this 0.
    misrouted: int = 0
    first_seen: float | None = None  # monotonic time of the first output read
    last_seen: float | None = None  # monotonic time of the last output read

    @property
    def repeated(self) -> dict[tuple[str, str], int]:
        """Identities accepted more than once: exactly-once means this is empty."""
        return {ident: n for ident, n in self.identities.items() if n > 1}

    @property
    def total(self) -> int:
        return self.accepted + sum(self.rejected.values())


class OutputReader:
    def __init__(
        self, settings: Settings, *, keep_identities: bool = True, isolation_level: str = "read_committed"
    ) -> None:
        self.settings = settings
        self.isolation_level = isolation_level
        self.keep_identities = keep_identities
        self.outputs = Outputs()
        self._partitioner = Partitioner(settings.partitions)
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> OutputReader:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            isolation_level=self.isolation_level,
            auto_offset_reset="earliest",
            fetch_max_bytes=32 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def snapshot(self) -> dict[TopicPartition, int]:
        """End offsets now: outputs written after this point are the run's."""
        assert self._consumer is not None
        partitions = [
            TopicPartition(topic, p)
            for topic in (self.settings.topic_accepted, self.settings.topic_rejected)
            for p in range(self.settings.partitions)
        ]
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(partitions)
        return ends

    async def start_from(self, offsets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        self._consumer.assign(list(offsets))
        for tp, offset in offsets.items():
            self._consumer.seek(tp, offset)

    async def poll(self, timeout_ms: int = 200) -> int:
        """Read what is there now (waiting up to ``timeout_ms``); return how many outputs were read."""
        assert self._consumer is not None
        out = self.outputs
        accepted_topic = self.settings.topic_accepted
        read = 0
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=50_000)
        for tp, records in batches.items():
            for record in records:
                if tp.topic == accepted_topic:
                    events = batch_splitter.decode(record.value or b"[]")
                    out.accepted += len(events)
                    read += len(events)
                    if self.keep_identities:
                        for raw in events:
                            ident = identity_decoder.decode(raw)
                            out.identities[(ident.source, ident.id)] += 1
                            if self._partitioner(ident.subject) != tp.partition:
                                out.misrouted += 1
                else:
                    out.rejected[reason_of(record.headers) or "missing_reason"] += 1
                    read += 1
        if read:
            out.last_seen = time.monotonic()
            out.first_seen = out.first_seen or out.last_seen
        return read

    async def read_until(
        self, expected_total: int, idle_timeout_s: float = 30.0, drain_s: float = 2.0
    ) -> Outputs:
        """Read until ``expected_total`` outputs (accepted + rejected), then ``drain_s`` more to catch
        extras (a repeated output would show there); or until nothing came for ``idle_timeout_s``."""
        last_progress = time.monotonic()
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is None and self.outputs.total >= expected_total:
                drain_until = now + drain_s
            if (drain_until is not None and now >= drain_until) or now - last_progress > idle_timeout_s:
                return self.outputs
            if await self.poll():
                last_progress = time.monotonic()
