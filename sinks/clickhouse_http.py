"""ClickHouse's HTTP interface over an embedded engine (chdb), for the readers of a chdb path.

Only one process can open a chdb path. The worker that owns it (its analytics agent) serves this
interface on loopback, read-only, so every other reader - ``tally stats``, ``tally reconcile``,
the HTTP API, Grafana's ClickHouse data source in HTTP mode, tests - connects with the same
clickhouse-connect ``http://`` client it would use for a ClickHouse server: one code path for
reading, whichever engine is behind it. ``tally clickhouse serve`` runs it read-write as a
stand-alone server over a path (development, and the fault tests' ClickHouse outage: stop it).

What it implements of https://clickhouse.com/docs/interfaces/http: ``GET /ping``; a query from
the ``query`` parameter followed by the request body (so an INSERT's data may follow its
statement); ``param_<name>`` bound parameters; ``database``; every other parameter a setting,
except the transport ones the engine has no use for; the ``X-ClickHouse-*`` response headers
clickhouse-connect reads; errors as HTTP 500 with ClickHouse's ``Code: N. DB::Exception`` text
and ``X-ClickHouse-Exception-Code``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from aiohttp import web
from clickhouse_connect.driver.client import Client

from sinks.clickhouse import error_code

log = logging.getLogger(__name__)

# Parameters of the HTTP transport, not engine settings.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "user",
        "password",
        "quota_key",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        # Never passed on: chdb applies a query's settings to its handle's session and restores
        # them after, but cannot restore anything once ``readonly`` is set.
        "readonly",
    }
)
# Settings a reader may set for its query (the rest are dropped): limits and output shapes.
READER_SETTINGS = frozenset(
    {
        "max_execution_time",
        "timeout_overflow_mode",
        "max_result_rows",
        "max_result_bytes",
        "result_overflow_mode",
        "max_rows_to_read",
        "max_bytes_to_read",
        "read_overflow_mode",
        "max_block_size",
        "max_threads",
        "date_time_output_format",
        "session_timezone",
    }
)
# Table functions that reach past the database: files, URLs, object stores, other servers.
_OUTSIDE = re.compile(
    rb"\b(file|fileCluster|url|urlCluster|s3|s3Cluster|gcs|azureBlobStorage|hdfs|remote|remoteSecure|"
    rb"cluster|clusterAllReplicas|mysql|postgresql|mongodb|redis|sqlite|jdbc|odbc|executable|"
    rb"iceberg\w*|deltaLake\w*|hudi\w*|input)\s*\(",
    re.IGNORECASE,
)
READ_STATEMENTS = frozenset({b"SELECT", b"WITH", b"SHOW", b"DESCRIBE", b"DESC", b"EXISTS", b"EXPLAIN"})
# The first keyword, after any leading whitespace, comments and opening parentheses.
_KEYWORD = re.compile(rb"(?:\s|--[^\n]*\n|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)
_FORMAT = re.compile(rb"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
# ClickHouse's own mapping of some error codes to HTTP statuses (the rest are 500).
_STATUS = {60: 404, 81: 404, 62: 400, 46: 400, 47: 400, 164: 403, 497: 403}


class ClickHouseHttpServer:
    """Serves ``client``. Read-only, ``client`` must be the server's own handle on the path (a
    second ``connect`` in the owner's process: chdb keeps settings per handle): ``start`` sets the
    engine's ``readonly = 2`` on it, so its sessions can read and change their own settings but
    never write, whatever a statement hides, and the owner's inserts on the other handle never
    wait for a reader's query nor see a reader's settings."""

    def __init__(self, client: Client, host: str, port: int, *, read_only: bool) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.read_only = read_only
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Serve; return the URL readers connect to (``http://host:port``)."""
        if self.read_only:
            await asyncio.to_thread(self.client.command, "SET readonly = 2")
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/ping", self._ping)
        app.router.add_route("*", "/", self._query)
        runner = self._runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        server = site._server  # aiohttp keeps the bound socket here; port 0 picks a free one
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]  # asyncio.Server
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _query(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        body = await request.read()
        sql = params.get("query", "").encode()
        if body:
            sql = sql + b"\n" + body if sql else body
        if not sql.strip():
            return _error(400, 62, "Empty query")
        bound = {
            name.removeprefix("param_"): value for name, value in params.items() if name.startswith("param_")
        }
        settings = {
            name: value
            for name, value in params.items()
            if name not in TRANSPORT_PARAMS and not name.startswith("param_")
        }
        if self.read_only:
            # Readers share the handle's session: only settings that shape one query's answer.
            settings = {name: value for name, value in settings.items() if _reader_setting(name)}
            refusal = _refusal(sql)
            if refusal is not None:
                return _error(403, 164, f"{refusal}: this endpoint serves reads only (READONLY)")
        # A query's own FORMAT clause wins; an INSERT's names its input (its data follows it).
        is_insert = sql.lstrip()[:6].upper() == b"INSERT"
        match = None if is_insert else _FORMAT.search(sql[-200:])
        fmt = match.group(1).decode() if match else params.get("default_format", "TabSeparated")
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            result = await asyncio.to_thread(
                self.client.raw_query,
                sql.decode(errors="replace"),
                parameters=bound or None,
                settings=settings or None,
                fmt=None if is_insert or match else fmt,  # else the client appends a second FORMAT
            )
        except Exception as exc:  # every engine error goes back to the client, as ClickHouse does
            code = error_code(exc) or 1000
            return _error(_STATUS.get(code, 500), code, str(exc), query_id)
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": "UTC",
            "X-ClickHouse-Server-Display-Name": "tally-chdb",
            "Content-Type": "application/octet-stream",
        }
        return web.Response(body=result, headers=headers)


def _refusal(sql: bytes) -> str | None:
    """Why a reader's statement is refused before the engine sees it, or None. The engine's
    ``readonly`` refuses every write anyway; this also refuses what ``readonly`` allows and a
    dashboard never needs: reading the worker's files or other hosts through table functions,
    several statements in one request, and statements other than reads."""
    first = _KEYWORD.match(sql)
    if first is None or first.group(1).upper() not in READ_STATEMENTS:
        return "Only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN statements"
    if b";" in sql.rstrip().rstrip(b";"):
        return "One statement per request"
    if b"OUTFILE" in sql.upper() or _OUTSIDE.search(sql):
        return "No files, URLs or other servers (table functions such as file() and url())"
    return None


def _reader_setting(name: str) -> bool:
    return name in READER_SETTINGS or name.startswith("output_format_")


def _error(status: int, code: int, message: str, query_id: str = "") -> web.Response:
    text = message if message.startswith("Code:") else f"Code: {code}. DB::Exception: {message}"
    headers = {"X-ClickHouse-Exception-Code": str(code), "X-ClickHouse-Query-Id": query_id}
    return web.Response(status=status, text=text + "\n", headers=headers)
