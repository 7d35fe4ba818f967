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
        # Never passed on: chdb applies a query's settings to its one session and restores them
        # after, but cannot restore anything once ``readonly`` is set (the inserts would fail).
        "readonly",
    }
)
READ_STATEMENTS = frozenset({b"SELECT", b"WITH", b"SHOW", b"DESCRIBE", b"DESC", b"EXISTS", b"EXPLAIN"})
# The first keyword, after any leading whitespace, comments and opening parentheses.
_KEYWORD = re.compile(rb"(?:\s|--[^\n]*\n|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)
_FORMAT = re.compile(rb"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
# ClickHouse's own mapping of some error codes to HTTP statuses (the rest are 500).
_STATUS = {60: 404, 81: 404, 62: 400, 46: 400, 47: 400, 164: 403, 497: 403}


class ClickHouseHttpServer:
    def __init__(self, client: Client, host: str, port: int, *, read_only: bool) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.read_only = read_only
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Serve; return the URL readers connect to (``http://host:port``)."""
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
        if self.read_only and not _reads_only(sql):
            return _error(
                403, 164, "Cannot execute query in readonly mode: this endpoint serves reads only (READONLY)"
            )
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


def _reads_only(sql: bytes) -> bool:
    """A statement that reads: its first keyword is one of ``READ_STATEMENTS`` and it writes no
    file. (The engine's own ``readonly`` setting cannot be used: the owner's session is shared
    with its inserts, and a query-level ``readonly`` outlives the query in chdb's session.)"""
    first = _KEYWORD.match(sql)
    return first is not None and first.group(1).upper() in READ_STATEMENTS and b"OUTFILE" not in sql.upper()


def _error(status: int, code: int, message: str, query_id: str = "") -> web.Response:
    text = message if message.startswith("Code:") else f"Code: {code}. DB::Exception: {message}"
    headers = {"X-ClickHouse-Exception-Code": str(code), "X-ClickHouse-Query-Id": query_id}
    return web.Response(status=status, text=text + "\n", headers=headers)
