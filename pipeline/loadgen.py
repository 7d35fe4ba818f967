"""Synthetic usage for ``tally loadgen``, the demo, the tests and the benches.

``generate`` is pure (seeded RNG, explicit ``now``): it yields Kafka messages for ``usage.raw`` and
keeps, beside them, what Tally must make of them (``Expected``): which events are accepted, how many
are duplicates, and how many are rejected for each reason. The events are realistic: GPU heartbeats
(model, fractional VRAM, watts, utilization), API requests (endpoint, product, tokens) and storage
held over time, for ``accounts`` accounts, in single-event or batch messages.

Ordering rule that keeps ``Expected`` exact: every event whose identity is used again (a duplicate or
an ``id_conflict``) travels in a message keyed by its account, so it reaches ingest before its copies.
Only fresh, never-copied events go out under a wrong key or none.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

import msgspec

from pipeline.producer import TallyProducer
from pipeline.settings import Settings
from schemas.events import encode_batch
from schemas.rejections import Reason

GPU_MODELS = {  # model: (VRAM GB, board power W)
    "rtx_4090": (24, 450),
    "a100": (80, 400),
    "h100": (80, 700),
}
ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/images", "/v1/search", "/v1/agents/run"]
PRODUCTS = ["gpt-4", "claude-3", "llama-3-70b", "embed-small", None]
SERVICE_TYPES = ["model_inference", "mcp_service", "agent_execution", "api_gateway"]
STORAGE_KINDS = ["bucket", "filestore"]


class BadKind(StrEnum):
    """Kinds of bad input, each with the reason Tally must give it."""

    TRUNCATED_JSON = "truncated_json"
    NAN = "nan"
    BINARY_GARBAGE = "binary_garbage"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    NAIVE_TIME = "naive_time"
    VRAM_OVER_TOTAL = "vram_over_total"
    HUGE_NUMBER = "huge_number"
    UNKNOWN_TYPE = "unknown_type"
    NEGATIVE_COUNT = "negative_count"
    NEGATIVE_DECIMAL = "negative_decimal"
    TOO_LATE = "too_late"
    ANCIENT = "ancient"
    FUTURE = "future"
    FAR_FUTURE = "far_future"
    OVERSIZED_EVENT = "oversized_event"
    OVERSIZED_MESSAGE = "oversized_message"
    ID_CONFLICT = "id_conflict"
    SESSION_CONFLICT = "session_conflict"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNPRICED = "unpriced"


REASON_OF: dict[BadKind, Reason] = {
    BadKind.TRUNCATED_JSON: Reason.MALFORMED_JSON,
    BadKind.NAN: Reason.MALFORMED_JSON,
    BadKind.BINARY_GARBAGE: Reason.MALFORMED_JSON,
    BadKind.MISSING_FIELD: Reason.SCHEMA_VIOLATION,
    BadKind.WRONG_TYPE: Reason.SCHEMA_VIOLATION,
    BadKind.NAIVE_TIME: Reason.SCHEMA_VIOLATION,
    BadKind.VRAM_OVER_TOTAL: Reason.SCHEMA_VIOLATION,
    BadKind.HUGE_NUMBER: Reason.SCHEMA_VIOLATION,
    BadKind.UNKNOWN_TYPE: Reason.UNKNOWN_TYPE,
    BadKind.NEGATIVE_COUNT: Reason.NEGATIVE_QUANTITY,
    BadKind.NEGATIVE_DECIMAL: Reason.NEGATIVE_QUANTITY,
    BadKind.TOO_LATE: Reason.TOO_LATE,
    BadKind.ANCIENT: Reason.TOO_LATE,
    BadKind.FUTURE: Reason.TOO_FAR_IN_FUTURE,
    BadKind.FAR_FUTURE: Reason.TOO_FAR_IN_FUTURE,
    BadKind.OVERSIZED_EVENT: Reason.OVERSIZED,
    BadKind.OVERSIZED_MESSAGE: Reason.OVERSIZED,
    BadKind.ID_CONFLICT: Reason.ID_CONFLICT,
    BadKind.SESSION_CONFLICT: Reason.SESSION_CONFLICT,
    BadKind.UNKNOWN_ACCOUNT: Reason.UNKNOWN_ACCOUNT,
    BadKind.UNPRICED: Reason.UNPRICED,
}
# Kinds that are not JSON (or too big), so they can only travel as a message of their own.
WHOLE_MESSAGE_KINDS = {BadKind.TRUNCATED_JSON, BadKind.NAN, BadKind.BINARY_GARBAGE, BadKind.OVERSIZED_MESSAGE}


@dataclass(frozen=True)
class LoadPlan:
    events: int
    accounts: int = 100
    # Fractions of the events (not money): share of exact repeats and of bad input.
    duplicate_fraction: float = 0.05
    bad_fraction: float = 0.05
    batch_size: int = 1  # events per message; 1 = single-event messages
    bad_kinds: tuple[BadKind, ...] = tuple(BadKind)
    # Share of fresh events sent under a wrong key or no key (ingest must re-key them).
    wrong_key_fraction: float = 0.02
    seed: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    source: str = "tally-loadgen"
    max_event_bytes: int = 65_536
    max_message_bytes: int = 1_048_576
    # Event times: uniformly random over the last hour (the default: every window receives late
    # events), or ascending through the last ``time_span_s`` seconds as a live stream's are, with
    # ``late_fraction`` of them stamped 6-10 minutes back (later than the default 5-minute grace:
    # adjustments, several per window).
    ordered_time: bool = False
    late_fraction: float = 0.0
    time_span_s: int = 3600


@dataclass
class Expected:
    """What Tally must make of the generated messages."""

    accepted: set[tuple[str, str]] = field(default_factory=set)  # (source, id) of accepted events
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: int = 0
    messages: int = 0

    def merge(self, other: Expected) -> None:
        self.accepted |= other.accepted
        self.duplicates += other.duplicates
        self.rejected.update(other.rejected)
        self.events += other.events
        self.messages += other.messages


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    events: int


def account_ids(count: int) -> list[str]:
    return [f"acct-{i:05d}" for i in range(count)]


def generate(plan: LoadPlan, now: datetime, expected: Expected) -> Iterator[Message]:
    """Yield messages for ``plan``; record in ``expected`` what must come of them."""
    gen = _Generator(plan, now, expected)
    yield from gen.run()


class _Generator:
    def __init__(self, plan: LoadPlan, now: datetime, expected: Expected) -> None:
        self.plan = plan
        self.now = now
        self.rng = random.Random(plan.seed)
        self.expected = expected
        self.accounts = account_ids(plan.accounts)
        self.serial = 0
        self.reusable: list[dict[str, Any]] = []  # good events sent keyed: copies may follow them
        self.buffers: dict[str, list[bytes]] = {}
        self.bad_cycle = 0
        self.open_sessions: list[tuple[str, str]] = []  # (account, session id) started, not ended

    def run(self) -> Iterator[Message]:
        plan = self.plan
        for _ in range(plan.events):
            self.expected.events += 1
            draw = self.rng.random()
            if draw < plan.bad_fraction and plan.bad_kinds:
                kind = plan.bad_kinds[self.bad_cycle % len(plan.bad_kinds)]
                self.bad_cycle += 1
                yield from self._bad(kind)
            elif draw < plan.bad_fraction + plan.duplicate_fraction and self.reusable:
                original = self.rng.choice(self.reusable)
                self.expected.duplicates += 1
                yield from self._buffer(original["subject"], self._reformatted(original))
            elif self.rng.random() < plan.wrong_key_fraction:
                event = self._good()
                self.expected.accepted.add((event["source"], event["id"]))
                key = self.rng.choice(
                    [None, b"not-an-account", b"\xff\xfe\x00", self.rng.choice(self.accounts).encode()]
                )
                yield self._message(key, [msgspec.json.encode(event)])
            else:
                event = self._good()
                self.expected.accepted.add((event["source"], event["id"]))
                self.reusable.append(event)
                yield from self._buffer(event["subject"], msgspec.json.encode(event))
        for account, events in self.buffers.items():
            if events:
                yield self._message(account.encode(), events)
        self.buffers.clear()

    # Messages ----------------------------------------------------------------------------------

    def _buffer(self, account: str, event: bytes) -> Iterator[Message]:
        buffer = self.buffers.setdefault(account, [])
        buffer.append(event)
        if len(buffer) >= self.plan.batch_size:
            self.buffers[account] = []
            yield self._message(account.encode(), buffer)

    def _message(self, key: bytes | None, events: list[bytes]) -> Message:
        self.expected.messages += 1
        value = events[0] if self.plan.batch_size == 1 and len(events) == 1 else encode_batch(events)
        return Message(key, value, len(events))

    # Events ------------------------------------------------------------------------------------

    def _good(self, account: str | None = None) -> dict[str, Any]:
        self.serial += 1
        rng = self.rng
        keyed = account is not None
        account = account or rng.choice(self.accounts)
        kind = rng.random()
        time = self._time()
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"{self.plan.run_id}-{self.serial:09d}",
            "source": self.plan.source,
            "time": time.isoformat().replace("+00:00", "Z"),
            "subject": account,
        }
        if kind < 0.40:
            model = rng.choice(list(GPU_MODELS))
            vram, watts = GPU_MODELS[model]
            share = rng.choice([1, 2, 4])
            event["type"] = "gpu.usage.v1"
            event["data"] = {
                "session_id": f"sess-{account}-{rng.randint(0, 9)}",
                "provider_id": f"prov-{rng.randint(1, 10):02d}",
                "node_id": f"node-{rng.randint(1, 40):03d}",
                "gpu_model": model,
                "vram_total_gb": str(vram),
                "vram_allocated_gb": str(vram / share).removesuffix(".0"),
                "power_watts": str(rng.randint(watts // 3, watts)),
                "utilization": f"0.{rng.randint(0, 99):02d}",
                "interval_seconds": 60,
                "region": rng.choice(["eu-west", "us-east", "ap-south"]),
            }
        elif kind < 0.85:
            tokens = rng.randint(0, 4000)
            event["type"] = "api.request.v1"
            event["data"] = {
                "endpoint": rng.choice(ENDPOINTS),
                "request_count": rng.randint(1, 20),
                "tokens_in": tokens,
                "tokens_out": tokens // 3,
                "product_id": rng.choice(PRODUCTS),
                "service_type": rng.choice(SERVICE_TYPES),
                "status": rng.choice([200, 200, 200, 201, 429, 500]),
                "latency_ms": rng.randint(5, 3000),
            }
        elif kind < 0.95:
            event["type"] = "storage.usage.v1"
            event["data"] = {
                "storage_kind": rng.choice(STORAGE_KINDS),
                "resource_id": f"vol-{account}-{rng.randint(0, 3)}",
                "gb": f"{rng.randint(1, 5000)}.{rng.randint(0, 99):02d}",
                "duration_seconds": 3600,
            }
        elif kind < 0.975:
            session = f"sess-{self.plan.run_id}-{account}-{self.serial}"
            event["type"] = "session.started.v1"
            event["data"] = {
                "session_id": session,
                "resource_tier": rng.choice(["small", "medium", "large", "gpu"]),
                "gpu_model": "a100",
                "vram_total_gb": "80",
                "vram_allocated_gb": "40",
            }
            if not keyed:  # a copy for an id conflict keeps its original's account: no pairing
                self.open_sessions.append((account, session))
        else:
            # The end of a session started earlier (its start may still come later in event
            # time: the meter joins both ends in either order), else of one never started.
            session = f"sess-{self.plan.run_id}-{account}-{self.serial}"
            if not keyed and self.open_sessions:
                account, session = self.open_sessions.pop(rng.randrange(len(self.open_sessions)))
                event["subject"] = account
            event["type"] = "session.ended.v1"
            event["data"] = {
                "session_id": session,
                "reason": "completed",
                "duration_seconds": rng.randint(60, 7200),
            }
        return event

    def _time(self) -> datetime:
        rng, plan = self.rng, self.plan
        if not plan.ordered_time:
            return self.now - timedelta(seconds=rng.randint(0, 3600), microseconds=rng.randint(0, 999_999))
        progress = min(1.0, self.serial / max(1, plan.events))
        time = self.now - timedelta(seconds=plan.time_span_s * (1 - progress) - rng.random() * 2)
        if rng.random() < plan.late_fraction:
            time -= timedelta(minutes=6 + 4 * rng.random())
        return time

    def _reformatted(self, event: dict[str, Any]) -> bytes:
        """The same event as different bytes: another key order and UTC offset, or verbatim."""
        if self.rng.random() < 0.5:
            return msgspec.json.encode(event)
        time = datetime.fromisoformat(event["time"]).astimezone(timezone(timedelta(hours=2)))
        copy = dict(reversed(list({**event, "time": time.isoformat()}.items())))
        return msgspec.json.encode(copy)

    def _bad(self, kind: BadKind) -> Iterator[Message]:
        starts = [e for e in self.reusable if e["type"] == "session.started.v1"]
        if (kind is BadKind.ID_CONFLICT and not self.reusable) or (
            kind is BadKind.SESSION_CONFLICT and not starts
        ):
            kind = BadKind.WRONG_TYPE  # nothing to conflict with yet
        self.expected.rejected[REASON_OF[kind].value] += 1
        if kind in WHOLE_MESSAGE_KINDS:
            yield self._message(self.rng.choice(self.accounts).encode(), [self._whole_message(kind)])
            return
        if kind is BadKind.ID_CONFLICT:
            original = self.rng.choice(self.reusable)
            event = {**self._good(original["subject"]), "id": original["id"], "source": original["source"]}
        elif kind is BadKind.SESSION_CONFLICT:
            # A second start of a session already started (sent keyed, so after the first): a new
            # identity, another start time.
            original = self.rng.choice(starts)
            self.serial += 1
            moved = datetime.fromisoformat(original["time"]) + timedelta(minutes=1)
            event = {**original, "id": f"{self.plan.run_id}-{self.serial:09d}", "time": moved.isoformat()}
        else:
            event = self._good()
        account = event["subject"]  # the message key: taken before spoiling may change the subject
        self._spoil(kind, event)
        yield from self._buffer(account, msgspec.json.encode(event))

    def _whole_message(self, kind: BadKind) -> bytes:
        good = msgspec.json.encode(self._good())
        if kind is BadKind.TRUNCATED_JSON:
            return good[: len(good) // 2]
        if kind is BadKind.NAN:
            return good.replace(b'"specversion"', b'"load":NaN,"specversion"', 1)
        if kind is BadKind.BINARY_GARBAGE:
            return b"\xff\xfe\x00\x01" + bytes(self.rng.randrange(256) for _ in range(64))
        # OVERSIZED_MESSAGE: one event padded past the message limit (unknown fields are allowed).
        padding = "x" * (self.plan.max_message_bytes + 1024)
        return good.replace(b'"specversion"', b'"padding":"' + padding.encode() + b'","specversion"', 1)

    def _spoil(self, kind: BadKind, event: dict[str, Any]) -> None:  # noqa: PLR0912  # one case per kind
        now = self.now
        match kind:
            case BadKind.MISSING_FIELD:
                del event["source"]
            case BadKind.WRONG_TYPE:
                event["subject"] = 12345
            case BadKind.NAIVE_TIME:
                event["time"] = event["time"].removesuffix("Z")
            case BadKind.VRAM_OVER_TOTAL:
                event["type"], event["data"] = "gpu.usage.v1", _heartbeat("h100", vram_allocated_gb="96")
            case BadKind.HUGE_NUMBER:
                event["type"] = "api.request.v1"
                event["data"] = {"endpoint": "/v1/x", "request_count": 10**30}
            case BadKind.UNKNOWN_TYPE:
                event["type"] = "gpu.usage.v9"
            case BadKind.NEGATIVE_COUNT:
                event["type"] = "api.request.v1"
                event["data"] = {"endpoint": "/v1/x", "request_count": -3}
            case BadKind.NEGATIVE_DECIMAL:
                event["type"] = "storage.usage.v1"
                event["data"] = {
                    "storage_kind": "bucket",
                    "resource_id": "r",
                    "gb": "-12.5",
                    "duration_seconds": 60,
                }
            case BadKind.TOO_LATE:
                event["time"] = (now - timedelta(days=40)).isoformat()
            case BadKind.ANCIENT:
                event["time"] = "1970-01-01T00:00:00Z"
            case BadKind.FUTURE:
                event["time"] = (now + timedelta(days=2)).isoformat()
            case BadKind.FAR_FUTURE:
                event["time"] = "9999-12-31T23:59:59Z"
            case BadKind.OVERSIZED_EVENT:
                event["padding"] = "y" * (self.plan.max_event_bytes + 100)
            case BadKind.UNKNOWN_ACCOUNT:
                event["subject"] = f"ghost-{self.serial}"
            case BadKind.UNPRICED:  # valid, but no price book prices this GPU model
                event["type"], event["data"] = (
                    "gpu.usage.v1",
                    _heartbeat("quantum_q1", vram_allocated_gb="80"),
                )
            case BadKind.ID_CONFLICT | BadKind.SESSION_CONFLICT:
                pass  # already a different payload under a seen identity, or session start
            case _:  # pragma: no cover - whole-message kinds never reach here
                raise AssertionError(kind)


def _heartbeat(gpu_model: str, vram_allocated_gb: str) -> dict[str, Any]:
    """A GPU heartbeat payload of an 80 GB card for the bad kinds that need one."""
    return {
        "session_id": "s",
        "provider_id": "p",
        "node_id": "n",
        "gpu_model": gpu_model,
        "vram_total_gb": "80",
        "vram_allocated_gb": vram_allocated_gb,
        "power_watts": "700",
        "utilization": "0.5",
        "interval_seconds": 60,
    }


def default_now() -> datetime:
    return datetime.now(UTC)


async def publish(
    settings: Settings,
    messages: Iterable[Message],
    *,
    rate: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
    chunk: int = 2_000,
    hold: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[int, float]:
    """Send ``messages`` to ``usage.raw`` at about ``rate`` events/s (0: as fast as possible).
    ``hold``, if given, is awaited with the events sent so far after each chunk: a caller's way
    to keep publishing from running ahead of something it watches.

    Returns (events sent, seconds taken). Every message is acknowledged before this returns.
    """
    started = time.monotonic()
    sent = 0
    async with TallyProducer(settings) as producer:
        pending: list[tuple[bytes | None, bytes]] = []
        pending_events = 0
        for message in messages:
            pending.append((message.key, message.value))
            pending_events += message.events
            if len(pending) >= chunk:
                await producer.send_raw(pending)
                sent += pending_events
                if on_progress is not None:
                    on_progress(pending_events)
                pending, pending_events = [], 0
                if hold is not None:
                    await hold(sent)
                if rate > 0:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        if pending:
            await producer.send_raw(pending)
            sent += pending_events
            if on_progress is not None:
                on_progress(pending_events)
    return sent, time.monotonic() - started
