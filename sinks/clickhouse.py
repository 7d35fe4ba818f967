"""ClickHouse through clickhouse-connect only: ``chdb:///path`` (embedded) or ``http(s)://host:port``.

The same code and SQL run on both. Three things live here:
- ``connect``: a client for a URL;
- ``migrate``: the versioned DDL under ``schemas/clickhouse/`` (``tally db upgrade``), each file
  applied once, in name order, recorded in ``tally_schema_versions``;
- ``ClickHouseSink.insert``: one batch of JSONEachRow rows into one table, idempotent on its
  token. The raw topics' messages already are JSON arrays of rows (usage.accepted events,
  charges), so a batch is those arrays joined, never decoded in Python: the engine parses them
  (~300,000 rows/s into usage_events here, against ~3 us per row for a Python decode).

Errors are sorted into two kinds, because the agent treats them differently:
- ``BadRowsError``: the engine refused the data itself (a parse or type error). Retrying the same
  bytes fails the same way; the agent finds the offending messages and dead-letters them.
- anything else (connection refused, timeouts, too many parts, memory): ClickHouse is unavailable
  or slow; the agent pauses and retries the same batch with the same token later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

log = logging.getLogger(__name__)

DDL_DIR = Path(__file__).resolve().parent.parent / "schemas" / "clickhouse"
VERSIONS_TABLE = "tally_schema_versions"

# ClickHouse error codes that mean "this data is wrong", not "the server is unavailable": parse
# and conversion failures of the inserted rows (ErrorCodes.cpp). Not 1001 (STD_EXCEPTION): file
# system and memory failures come as that too, and retrying them is right.
BAD_DATA_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        407,  # DECIMAL_OVERFLOW
        457,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE (decimal)
    }
)
_CODE = re.compile(r"Code: (\d+)\.")

# Settings every insert carries:
INSERT_SETTINGS: dict[str, Any] = {
    # ISO 8601 with an offset (ingest writes "...Z", charges "+00:00").
    "date_time_input_format": "best_effort",
    # A CloudEvent has attributes the table does not keep (specversion, datacontenttype).
    "input_format_skip_unknown_fields": 1,
    # The data tuple is the union of every type's fields: an event has some of them.
    "input_format_json_defaults_for_missing_elements_in_named_tuple": 1,
    "input_format_json_ignore_unknown_keys_in_named_tuple": 1,
    # A retried block is dropped by the materialized views' targets too, not only the raw table.
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    # The views have summed each block already: merging its equal keys again at insert is work
    # the background merges do anyway (+20% rows/s, bench/analytics).
    "optimize_on_insert": 0,
    # Push each block into the raw table's views concurrently (3 read the raw rows): +3-10% rows/s
    # on this 2-core machine, in runs whose spread is +-20%.
    "parallel_view_processing": 1,
}


class BadRowsError(ValueError):
    """ClickHouse refused the rows themselves; retrying the same bytes cannot succeed."""


def error_code(exc: BaseException) -> int | None:
    match = _CODE.search(str(exc))
    return int(match.group(1)) if match else None


def is_bad_data(exc: BaseException) -> bool:
    return isinstance(exc, ClickHouseError) and error_code(exc) in BAD_DATA_CODES


def connect(url: str) -> Client:
    """A clickhouse-connect client for ``chdb:///path`` or ``http(s)://[user:password@]host:port[/db]``.

    Only one process can open a chdb path (a second gets ``Cannot lock file .../status``), and one
    process only one path: locally the analytics agent owns it and serves every other reader
    (``reader``). Raises ``PathLockedError`` when another process holds the path.
    """
    # The tables keep UTC; datetimes come back aware, whatever the host's zone.
    if url.startswith("chdb:"):
        path = url.removeprefix("chdb://")
        if path and path != "memory":
            Path(path).mkdir(parents=True, exist_ok=True)
        try:
            return clickhouse_connect.get_client(dsn=url, tz_mode="aware")
        except ClickHouseError as exc:
            if "Cannot lock file" in str(exc):
                raise PathLockedError(f"{path} is open in another process (a running worker?)") from exc
            raise
    # Loopback or a private network: compressing costs more CPU than it saves here.
    return clickhouse_connect.get_client(dsn=url, tz_mode="aware", compress=False)


class PathLockedError(RuntimeError):
    """Another process has the chdb path open."""


def endpoint_file(chdb_url: str) -> Path:
    """Where the process that owns a chdb path publishes its HTTP interface: ``<path>.endpoint``."""
    path = Path(chdb_url.removeprefix("chdb://"))
    return path.with_name(path.name + ".endpoint")


def reader(url: str) -> Client:
    """A client for reading analytics: a server directly; a chdb path through the HTTP interface of
    the worker that owns it (``sinks.clickhouse_http``), or directly when no process holds it."""
    if url.startswith("chdb:"):
        published = endpoint_file(url)
        if published.is_file():
            try:
                return connect(published.read_text(encoding="utf-8").strip())
            except Exception:  # a stale file (its worker was killed): try the path
                log.debug("analytics endpoint in %s does not answer", published)
    return connect(url)


def ddl_files() -> list[Path]:
    return sorted(DDL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def statements(sql: str) -> list[str]:
    """The statements of a DDL file: split on ';' at a line end, comments dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    parts = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return [part.strip() for part in parts if part.strip()]


def migrate(client: Client) -> list[str]:
    """Apply the DDL files not applied yet; return their names. Every statement is idempotent
    (IF NOT EXISTS), so a file cut short by a crash is applied again whole."""
    client.command(
        f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (version UInt32, name String, "
        "applied_at DateTime('UTC') DEFAULT now()) ENGINE = MergeTree ORDER BY version"
    )
    versions = client.query(f"SELECT version FROM {VERSIONS_TABLE}")  # noqa: S608  # a constant
    applied = {row[0] for row in versions.result_rows}
    done = []
    for path in ddl_files():
        version = int(path.name[:4])
        if version in applied:
            continue
        for statement in statements(path.read_text(encoding="utf-8")):
            client.command(statement)
        client.insert(VERSIONS_TABLE, [[version, path.name]], column_names=["version", "name"])
        done.append(path.name)
        log.info("clickhouse: applied %s", path.name)
    return done


class ClickHouseSink:
    """JSONEachRow batches into the analytics tables."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def insert(self, table: str, arrays: Sequence[bytes], token: str) -> None:
        """Insert the rows of ``arrays`` (JSON arrays of objects, each a Kafka message's value)
        into ``table`` as one block, deduplicated on ``token``: the same token again within the
        table's window (10,000 blocks) writes nothing, in the table and in its rollups."""
        body = join_arrays(arrays)
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": token}
        try:
            self.client.raw_insert(table, None, body, fmt="JSONEachRow", settings=settings)
        except ClickHouseError as exc:
            if is_bad_data(exc):
                raise BadRowsError(str(exc)) from exc
            raise


def join_arrays(arrays: Sequence[bytes]) -> bytes:
    """One JSON array of the rows of several (``[a,b]`` + ``[c]`` -> ``[a,b,c]``): the engine's
    JSONEachRow reads one array per insert, not several."""
    inner = [array.strip()[1:-1] for array in arrays]
    return b"[" + b",".join(part for part in inner if part.strip()) + b"]"
