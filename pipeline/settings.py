"""The one typed settings object: every ``TALLY_`` variable, checked together at start-up.

Every environment read of the project happens here: variables are prefixed ``TALLY_``, validated at
start-up, and every problem is reported at once (``tally config --check``). Secrets are held as
``SecretStr`` or masked when printed.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.config import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent


_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

PositiveInt = Annotated[int, Field(gt=0)]


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Settings(BaseSettings):
    """Tally's configuration. Field names map to ``TALLY_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", validate_default=True)

    data_dir: Path = REPO_ROOT / ".data"
    # Production services. Empty means the local stack that deploy/local/tally-local starts, on
    # loopback at the local_*_port below (non-default ports: never a user's own servers).
    kafka_url: str = ""
    postgres_url: str = ""
    redis_url: str = ""
    clickhouse_url: str = ""  # empty means chdb:///<data_dir>/clickhouse
    local_kafka_port: Annotated[int, Field(ge=1, le=65535)] = 39092
    local_postgres_port: Annotated[int, Field(ge=1, le=65535)] = 35432
    local_redis_port: Annotated[int, Field(ge=1, le=65535)] = 36379

    # The stages this worker runs (comma-separated): all of them by default; a deployment may run
    # them in separate processes, e.g. the analytics agent apart from the money path.
    stages: str = ",".join(STAGES)
    # Stable identity of this worker process: names its local state directory, so a restarted
    # worker reopens its own dedupe store instead of restoring it from the changelog.
    worker_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "worker-1"
    app_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "tally"

    # Topics (docs/ARCHITECTURE.md, "Following one event").
    topic_raw: str = "usage.raw"
    topic_accepted: str = "usage.accepted"
    topic_rejected: str = "usage.rejected"
    topic_charges: str = "charges"
    partitions: Annotated[int, Field(ge=1, le=1024)] = 6
    replication_factor: Annotated[int, Field(ge=1, le=16)] = 1

    # Ingest limits. A Kafka message above max_message_bytes, or an event above max_event_bytes,
    # is rejected as ``oversized`` (the broker's own limit is 4 MiB on the local stack).
    max_message_bytes: PositiveInt = 1_048_576
    max_event_bytes: PositiveInt = 65_536
    # Events stamped further ahead than this are ``too_far_in_future`` (clock skew allowance).
    future_tolerance: timedelta = timedelta(minutes=5)
    # Dedupe horizon and correction horizon: older events are ``too_late``.
    dedupe_horizon: timedelta = timedelta(days=35)
    # Meter windows (event time): size, grace for late events, and how long a partition may be
    # idle before the wall clock closes its windows (else the last windows of a stream would wait
    # for the next event). Later than the grace but within dedupe_horizon: an adjustment charge.
    window_size: timedelta = timedelta(seconds=60)
    window_grace: timedelta = timedelta(minutes=5)
    window_idle_close: timedelta = timedelta(seconds=30)
    # A GPU session without a heartbeat (by event time) for this long has ended, when no
    # ``session.ended`` said so: its time is then rounded up and its minimum charged (PRICING.md).
    session_idle_timeout: timedelta = timedelta(minutes=5)
    # Price books: ``<name>.yaml`` files in this directory. An account is rated with its plan's
    # book (Postgres ``plans.price_book``); an account without a plan with ``default_price_book``.
    price_books_dir: Path = REPO_ROOT / "schemas" / "pricebooks"
    default_price_book: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")] = "default"
    # How often the meter re-reads account plans from Postgres, and how long a partition's start
    # waits for that read (the read runs off the event loop; pipeline/plans.py).
    plans_refresh: timedelta = timedelta(seconds=30)
    plans_read_timeout: Annotated[timedelta, Field(gt=timedelta(0))] = timedelta(seconds=10)
    # Optional file of known account ids (one per line). Unset: every well-formed subject is known.
    accounts_file: Path | None = None

    # Batching of the transactional loops: records per poll and longest wait for a poll.
    poll_max_records: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000
    poll_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 200
    # Bytes a poll may bring per partition and in all: bounds a transaction's work when messages
    # are batches (20,000 records of 100 events would be 2,000,000 events).
    fetch_partition_bytes: Annotated[int, Field(ge=65_536, le=64 * 1024 * 1024)] = 4 * 1024 * 1024
    fetch_total_bytes: Annotated[int, Field(ge=65_536, le=256 * 1024 * 1024)] = 32 * 1024 * 1024
    # Consumer group session timeout: how long the group waits for a silent (dead) member before
    # handing its partitions over. The broker's floor is 6 s (group.min.session.timeout.ms).
    session_timeout_ms: Annotated[int, Field(ge=6_000, le=300_000)] = 10_000
    # Kafka transaction timeout: a transaction open longer than this is aborted by the broker.
    transaction_timeout_ms: Annotated[int, Field(ge=1_000, le=900_000)] = 60_000

    # Analytics (ClickHouse): a partition's batch is inserted once it holds this many rows or is
    # this old, whichever comes first (the engine writes ~300,000 rows/s in 10k-100k-row inserts
    # and ~95,000 in 1k-row ones, so batches are made large, and the interval bounds the delay).
    analytics_batch_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 100_000
    analytics_batch_interval: timedelta = timedelta(seconds=2)
    # First wait before retrying a failed insert (doubling up to analytics_retry_max).
    analytics_retry_min: timedelta = timedelta(milliseconds=500)
    analytics_retry_max: timedelta = timedelta(seconds=10)
    # How often consumer lag and account balances are sampled into ClickHouse (the dashboards'
    # pipeline-health and low-balance panels).
    analytics_sample_interval: timedelta = timedelta(seconds=15)
    # With the embedded engine (chdb), the worker that owns the path serves every other reader
    # ClickHouse's HTTP interface on this loopback port (0: any free port, published in
    # <clickhouse path>.endpoint). Read-only.
    analytics_http_host: str = "127.0.0.1"
    analytics_http_port: Annotated[int, Field(ge=0, le=65535)] = 0

    @model_validator(mode="after")
    def _local_defaults(self) -> Settings:
        if not self.kafka_url:
            self.kafka_url = f"kafka://127.0.0.1:{self.local_kafka_port}"
        if not self.postgres_url:
            self.postgres_url = f"postgresql://tally@127.0.0.1:{self.local_postgres_port}/tally"
        if not self.redis_url:
            self.redis_url = f"redis://127.0.0.1:{self.local_redis_port}/0"
        if not self.clickhouse_url:
            self.clickhouse_url = f"chdb://{self.data_dir / 'clickhouse'}"
        return self

    @field_validator("kafka_url")
    @classmethod
    def _kafka_url(cls, value: str) -> str:
        if not value:
            return value
        for server in value.split(","):
            parts = urlsplit(server if "://" in server else f"kafka://{server}")
            if parts.scheme not in {"kafka", "aiokafka"} or not parts.hostname or not parts.port:
                raise ValueError(f"expected kafka://host:port[,host:port...], got {value!r}")
        return value

    @field_validator("postgres_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
            raise ValueError(f"expected postgresql://user@host:port/db, got {mask_url(value)!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in {"redis", "rediss"}:
            raise ValueError(f"expected redis://host:port/db, got {mask_url(value)!r}")
        return value

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in {"chdb", "http", "https"}:
            raise ValueError(f"expected chdb:///path or http(s)://host:port, got {mask_url(value)!r}")
        return value

    @field_validator("topic_raw", "topic_accepted", "topic_rejected", "topic_charges")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not _TOPIC_NAME.match(value):
            raise ValueError(f"not a valid Kafka topic name: {value!r}")
        return value

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = sorted(set(names) - set(STAGES))
        if unknown or not names:
            raise ValueError(f"expected a comma-separated subset of {', '.join(STAGES)}, got {value!r}")
        return ",".join(names)

    @field_validator("accounts_file")
    @classmethod
    def _accounts_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"accounts file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:  # noqa: PLR0912  # one branch per rule, every problem listed
        problems = []
        if self.max_event_bytes > self.max_message_bytes:
            problems.append("max_event_bytes must not exceed max_message_bytes")
        if self.future_tolerance < timedelta(0):
            problems.append("future_tolerance must not be negative")
        if self.dedupe_horizon < timedelta(hours=1):
            problems.append("dedupe_horizon must be at least 1 hour")
        if self.window_size < timedelta(seconds=1) or self.window_size.total_seconds() % 1:
            problems.append("window_size must be a whole number of seconds, at least 1")
        elif 86_400 % self.window_size.total_seconds():
            problems.append("window_size must divide a day (windows align to UTC midnight)")
        if self.window_grace < timedelta(0) or self.window_grace.total_seconds() % 1:
            problems.append("window_grace must be a whole number of seconds, not negative")
        if self.window_grace + self.window_size >= self.dedupe_horizon:
            problems.append("window_size + window_grace must be shorter than dedupe_horizon")
        if self.window_idle_close < timedelta(seconds=1):
            problems.append("window_idle_close must be at least 1 second")
        if self.session_idle_timeout < timedelta(seconds=1) or self.session_idle_timeout.total_seconds() % 1:
            problems.append("session_idle_timeout must be a whole number of seconds, at least 1")
        if self.analytics_batch_interval < timedelta(milliseconds=10):
            problems.append("analytics_batch_interval must be at least 10 ms")
        if not timedelta(milliseconds=10) <= self.analytics_retry_min <= self.analytics_retry_max:
            problems.append("analytics_retry_min must be at least 10 ms and at most analytics_retry_max")
        if self.analytics_sample_interval < timedelta(seconds=1):
            problems.append("analytics_sample_interval must be at least 1 second")
        if not (self.price_books_dir / f"{self.default_price_book}.yaml").is_file():
            problems.append(
                f"default_price_book: no file {self.default_price_book}.yaml in {self.price_books_dir}"
            )
        topics = {
            self.topic_raw,
            self.topic_accepted,
            self.topic_rejected,
            self.topic_charges,
        }
        if len(topics) != 4:
            problems.append("the topics must have distinct names")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        """``host:port[,host:port]`` for aiokafka."""
        return ",".join(
            urlsplit(s if "://" in s else f"kafka://{s}").netloc for s in self.kafka_url.split(",")
        )

    def group_id(self, stage: str) -> str:
        """The consumer group of a stage (``<app>-<stage>``)."""
        return f"{self.app_id}-{stage}"

    @property
    def stage_names(self) -> frozenset[str]:
        return frozenset(self.stages.split(","))

    @property
    def state_dir(self) -> Path:
        """Local state of this worker (dedupe stores), one directory per worker id."""
        return self.data_dir / "state" / self.worker_id

    def known_accounts(self) -> frozenset[str] | None:
        if self.accounts_file is None:
            return None
        lines = self.accounts_file.read_text(encoding="utf-8").splitlines()
        return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))

    def redacted(self) -> dict[str, Any]:
        """Settings as printable values, passwords masked."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name.endswith("_url") and isinstance(value, str):
                out[name] = mask_url(value)
            else:
                out[name] = str(value) if isinstance(value, Path | timedelta) else value
        return out


class SettingsError(Exception):
    """Start-up configuration is invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings from the environment; raise ``SettingsError`` listing all problems."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            env = f"TALLY_{where.upper()}" if where else "settings"
            problems.append(f"{env}: {error['msg']}")
        raise SettingsError(problems) from None
