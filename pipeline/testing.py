"""Harness for tests and benches against the real services, shipped with Tally (as bytewax ships
its testing sources and sinks): isolated settings, worker processes, Apache Kafka's own clients.

Nothing here skips: when Kafka cannot be reached it fails with how to provide it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from pipeline.loadgen import Message, account_ids, publish
from pipeline.outputs import OutputReader
from pipeline.settings import REPO_ROOT, Settings, load_settings, mask_url
from pipeline.topics import create_topics
from sinks.postgres import upgrade

HOW_TO_PROVIDE = (
    "start the local stack with `make up` (or deploy/local/tally-local start), "
    "or point TALLY_KAFKA_URL at a Kafka 4.x broker with transactions enabled"
)


class ServiceUnavailableError(RuntimeError):
    """A real service the caller needs cannot be reached."""


def require_kafka(settings: Settings) -> None:
    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return
    except OSError as exc:
        raise ServiceUnavailableError(
            f"Kafka is not reachable at {settings.kafka_bootstrap} ({exc}): {HOW_TO_PROVIDE}"
        ) from None


def isolated_settings(
    data_dir: Path, accounts: int = 100, prefix: str = "test", **overrides: object
) -> Settings:
    """Settings with topics, consumer groups and a Postgres database of their own, so counts
    belong to one test alone."""
    run = f"{prefix}-{uuid.uuid4().hex[:8]}"
    accounts_file = data_dir / "accounts.txt"
    data_dir.mkdir(parents=True, exist_ok=True)
    accounts_file.write_text("\n".join(account_ids(accounts)) + "\n", encoding="utf-8")
    base = load_settings()
    values: dict[str, object] = {
        "data_dir": data_dir,
        "kafka_url": base.kafka_url,
        "app_id": f"{run}",
        "topic_raw": f"{run}.usage.raw",
        "topic_accepted": f"{run}.usage.accepted",
        "topic_rejected": f"{run}.usage.rejected",
        "topic_charges": f"{run}.charges",
        "accounts_file": accounts_file,
        # An embedded engine path of its own (one process can open a path; tests run many).
        "clickhouse_url": f"chdb://{data_dir / 'clickhouse' / run}"
        if base.clickhouse_url.startswith("chdb:")
        else base.clickhouse_url,
        "session_timeout_ms": 6_000,
        **overrides,
    }
    settings = load_settings(**values)
    require_kafka(settings)
    asyncio.run(create_topics(settings))
    # Charge ids are deterministic (account, meter, window...): two runs over the same accounts
    # and minutes must not share a ledger, or the second one's charges would be "replays".
    return isolated_database(settings)


def isolated_database(settings: Settings) -> Settings:
    """A new, empty, migrated Postgres database for one test; settings pointing at it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
    except psycopg.OperationalError as exc:
        raise ServiceUnavailableError(
            f"Postgres is not reachable at {mask_url(settings.postgres_url)} ({exc}): start the local stack "
            "with `make up` (or deploy/local/tally-local start postgres), or set TALLY_POSTGRES_URL"
        ) from None
    parts = urlsplit(settings.postgres_url)
    isolated = settings.model_copy(update={"postgres_url": urlunsplit(parts._replace(path=f"/{name}"))})
    upgrade(isolated)
    return isolated


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process load the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            # Durations travel as ISO 8601 (PT300S), the form pydantic reads from a string.
            text = f"PT{value.total_seconds():f}S" if isinstance(value, timedelta) else str(value)
            env[f"TALLY_{name.upper()}"] = text
    env.update(extra)
    return env


class Worker:
    """A ``tally worker`` process, as operators run it."""

    def __init__(self, settings: Settings, worker_id: str = "worker-1") -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.log_path = settings.data_dir / "logs" / f"{worker_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = settings_env(self.settings, TALLY_WORKER_ID=self.worker_id)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1} ===\n".encode())
            self.process = subprocess.Popen(  # noqa: S603  # our own entry point, no shell
                [str(Path(sys.executable).with_name("tally")), "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        self.starts += 1
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, open transactions are left for fencing to abort."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(
                f"{self.worker_id} did not stop within {timeout} s; log {self.log_path}"
            ) from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        """The log of this start of the worker only (the file keeps every start's)."""
        return self.log().rsplit("=== start", 1)[-1]

    def times_logged(self, text: str) -> list[float]:
        """When this start logged each line containing ``text``, as epoch seconds. Faust's
        format: ``[2026-11-25 09:38:10,877] [pid] [INFO] ...``, in local time."""
        return [
            datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in self.current_log().splitlines()
            if text in line
        ]

    def wait_for_log(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        """Wait until this start of the worker has logged ``text`` ``count`` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.current_log().count(text) >= count:
                return
            assert self.alive(), (
                f"{self.worker_id} exited ({self.process and self.process.returncode}):\n{self.log()[-3000:]}"
            )
            time.sleep(0.2)
        raise RuntimeError(f"{self.worker_id} never logged {text!r} in {timeout} s:\n{self.log()[-3000:]}")


def kafka_tool(
    main_class: str, *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run one of Apache Kafka's own Java tools (a Kafka client that is not Tally's)."""
    launcher = REPO_ROOT / "deploy" / "local" / "tally-local"
    return subprocess.run(  # noqa: S603  # the project's launcher, arguments as a list, no shell
        [str(launcher), "kafka-tool", main_class, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=True,
    )


def console_produce(settings: Settings, lines: list[bytes], *options: str) -> None:
    """Publish ``lines`` to ``usage.raw`` with Apache Kafka's own console producer: one message
    per line, no key unless ``options`` say ``--property parse.key=true``."""
    kafka_tool(
        "org.apache.kafka.tools.ConsoleProducer",
        "--bootstrap-server",
        settings.kafka_bootstrap,
        "--topic",
        settings.topic_raw,
        *options,
        stdin=b"\n".join(lines) + b"\n",
    )


Fault = Callable[[], Awaitable[None]]
STALLED_S = 180.0  # a worker restart takes ~30 s (a rebalance and the state restored)


async def publish_with_faults(
    settings: Settings,
    messages: Sequence[Message],
    reader: OutputReader,
    must: int,
    faults: Sequence[tuple[float, Fault]],
    *,
    rate: float,
    after_each: Callable[[], None] | None = None,
) -> None:
    """Publish ``messages`` at ``rate`` events/s and fire each ``(fraction, fault)`` once the
    outputs ``reader`` counts reach that fraction of ``must``; returns when everything is
    published.

    Each fault must land while input is still unprocessed (it asserts so). Pacing by time alone
    does not make sure of that: a worker that is down or rebalancing for longer than the rest of
    the stream takes to publish comes back to the whole remainder and commits it in a few large
    transactions, past the last faults' marks at once (seen on a 2-core machine). So
    publishing is also held to at most a tenth of ``must`` ahead of the outputs seen. Events
    sent are counted in outputs by the share of the stream that has any (duplicates have none):
    when the outputs cross a mark below 0.9 (checked below), about that mark plus a tenth plus
    one chunk can have been published, which is short of ``must``. Publishing held while no
    output has come for ``STALLED_S`` fails the run rather than waiting for ever.
    """
    window = must // 10
    outputs_per_event = must / sum(message.events for message in messages)
    last = max(fraction for fraction, _ in faults)
    assert last < 0.9, f"a fault at {last:.0%} of the outputs can find the stream processed"
    progress = asyncio.Event()

    async def hold(sent: int) -> None:
        while sent * outputs_per_event - reader.outputs.total > window:
            progress.clear()
            await progress.wait()

    started = time.monotonic()
    publisher = asyncio.create_task(publish(settings, messages, rate=rate, chunk=200, hold=hold))
    pending = sorted(faults, key=lambda f: f[0])
    while pending or not publisher.done():
        await reader.poll()
        progress.set()
        quiet = time.monotonic() - max(reader.outputs.last_seen or 0.0, started)
        if quiet > STALLED_S:
            publisher.cancel()
            raise AssertionError(f"no output for {quiet:.0f} s with input unprocessed")
        if pending and reader.outputs.total >= pending[0][0] * must:
            assert reader.outputs.total < must, "the fault must land while input is still unprocessed"
            _, fault = pending.pop(0)
            await fault()
            if after_each is not None:
                after_each()
    await publisher


class ClickHouseServer:
    """``tally clickhouse serve``: a chdb path behind ClickHouse's HTTP interface, in a process of
    its own, so a test can take ClickHouse away from a worker (stop it) and give it back."""

    def __init__(self, path: Path, log_path: Path) -> None:
        self.path = path
        self.log_path = log_path
        with socket.socket() as probe:  # a free loopback port, kept across restarts
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ClickHouseServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env["TALLY_CLICKHOUSE_URL"] = f"chdb://{self.path}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603  # our own entry point, no shell
                [sys.executable, "-m", "pipeline.cli", "clickhouse", "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"clickhouse serve did not listen on {self.port} in {timeout} s")

    def kill(self) -> None:
        """SIGKILL: an outage as abrupt as a crashed server's (inserts in flight are lost)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
