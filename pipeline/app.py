"""The Faust app factory: ``tally worker`` runs this app.

The money path's stages (the meter: ingest, dedupe, windows, rating; the ledger) run as services
inside the Faust app on aiokafka directly (docs/ARCHITECTURE.md for why): Faust's per-message
path costs ~75 us and its tables write one changelog record per assignment, where these stages
need one transaction and one changelog record per poll.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from clickhouse_connect.driver.client import Client
from mode import Service

from agents.analytics import AnalyticsAgent
from agents.ledger import LedgerStage
from agents.meter import MeterStage
from agents.transactional import Stage, TransactionalLoop
from pipeline import kafka_frames
from pipeline.plans import PlanDirectory
from pipeline.settings import Settings
from sinks.clickhouse import ClickHouseSink, PathLockedError, connect, endpoint_file, migrate
from sinks.clickhouse_http import ClickHouseHttpServer

log = logging.getLogger(__name__)

# How often each stage logs its counters.
REPORT_INTERVAL_S = 10.0
# Longest wait for a stage to finish its transaction in flight when the worker stops.
STOP_TIMEOUT_S = 30.0
# How often a worker without the embedded engine's path tries to take it.
OWNER_RETRY_S = 5.0


class StageService(Service):
    """Runs one ``TransactionalLoop`` for the lifetime of the worker.

    Registered with ``app.service``, which takes a class: ``service_for`` makes one per stage. Such
    services start after Faust's own and stop before them, so a stopping worker first finishes its
    transaction in flight and leaves its consumer groups (a quick hand-over to the other workers).
    """

    stage_loop: TransactionalLoop

    async def on_start(self) -> None:
        self._running = self.add_future(self._run())
        self.add_future(self._report())

    async def _run(self) -> None:
        try:
            await self.stage_loop.run()
        except Exception as exc:
            # A bug or a lost broker, never bad input (input never raises): crash the worker so
            # its supervisor restarts it from the last committed offsets.
            log.exception("stage %s crashed; stopping the worker", self.stage_loop.stage.name)
            await self.crash(exc)

    async def _report(self) -> None:
        while not self.should_stop:
            await asyncio.sleep(REPORT_INTERVAL_S)
            log.info("stage %s: %s", self.stage_loop.stage.name, self.stage_loop.counters)

    async def on_stop(self) -> None:
        self.stage_loop.stop()
        # The loop ends its poll (at most poll_timeout_ms), finishes the transaction in flight,
        # releases its partitions and leaves the group.
        await asyncio.wait({self._running}, timeout=STOP_TIMEOUT_S)


def service_for(stage_loop: TransactionalLoop) -> type[StageService]:
    name = f"{stage_loop.stage.name.title()}Service"
    return type(
        name, (StageService,), {"stage_loop": stage_loop, "shortlabel": f"stage:{stage_loop.stage.name}"}
    )


class AnalyticsService(Service):
    """The analytics agent (agents.analytics) for the lifetime of the worker.

    With a ClickHouse server every worker runs it (the consumer group shares the partitions).
    With the embedded engine only one process can open the path: the worker that takes it runs
    the agent and serves the path read-only over ClickHouse's HTTP interface to every other
    reader, its address in ``<path>.endpoint``; the others retry every ``OWNER_RETRY_S`` and
    take over when the owner stops or dies (the engine's lock dies with its process).
    """

    settings: Settings

    async def on_start(self) -> None:
        self._agent: AnalyticsAgent | None = None
        self._running = self.add_future(self._run())

    async def _run(self) -> None:
        # Analytics never stops the money path: a failure restarts the agent, not the worker.
        while not self.should_stop:
            try:
                await self._serve()
            except Exception:
                log.exception("analytics agent failed; restarting it in %.0f s", OWNER_RETRY_S)
                await asyncio.sleep(OWNER_RETRY_S)

    async def _serve(self) -> None:
        settings = self.settings
        client = await self._take_clickhouse()
        if client is None:
            return
        server, published, readers = None, None, None
        try:
            if settings.clickhouse_url.startswith("chdb:"):
                # Readers get a handle of their own on the path (chdb keeps sessions per handle).
                readers = await asyncio.to_thread(connect, settings.clickhouse_url)
                server = ClickHouseHttpServer(
                    readers, settings.analytics_http_host, settings.analytics_http_port, read_only=True
                )
                published = endpoint_file(settings.clickhouse_url)
                published.write_text(await server.start(), encoding="utf-8")
                log.info("analytics: serving %s at %s", settings.clickhouse_url, published.read_text())
            self._agent = AnalyticsAgent(settings, ClickHouseSink(client))
            # A stop that came while this took ClickHouse found no agent to stop: it would run
            # until on_stop gave up (30 s). Nothing awaits between this check and run()'s start,
            # so a later stop finds the agent.
            if self.should_stop:
                return
            await self._agent.run()
        finally:
            if server is not None and published is not None:
                published.unlink(missing_ok=True)
                await server.stop()
            if readers is not None:
                readers.close()
            client.close()

    async def _take_clickhouse(self) -> Client | None:
        """A client with the DDL applied, once ClickHouse answers (or the path is free)."""
        waited = False
        while not self.should_stop:
            client = None
            try:
                client = await asyncio.to_thread(connect, self.settings.clickhouse_url)
                await asyncio.to_thread(migrate, client)
                return client
            except PathLockedError as exc:
                if not waited:
                    log.info("analytics: %s; this worker waits to take over", exc)
                    waited = True
            except Exception as exc:  # a server not up (yet): the agent waits for it
                log.warning("analytics: cannot reach ClickHouse (%s); retrying", str(exc)[:200])
                if client is not None:
                    client.close()
            await asyncio.sleep(OWNER_RETRY_S)
        return None

    async def on_stop(self) -> None:
        if self._agent is not None:
            self._agent.stop()
        await asyncio.wait({self._running}, timeout=STOP_TIMEOUT_S)


def stages(settings: Settings) -> list[Stage]:
    """The transactional stages this worker runs (a worker without the meter never loads plans
    or price books)."""
    built: list[Stage] = []
    if "meter" in settings.stage_names:
        built.append(MeterStage(settings, PlanDirectory(settings)))
    if "ledger" in settings.stage_names:
        built.append(LedgerStage(settings))
    return built


def create_app(settings: Settings) -> faust.App:
    kafka_frames.install()  # before any connection opens: every Kafka client of the worker uses it
    faust_dir = settings.data_dir / "faust" / settings.worker_id
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.kafka_url,
        web_enabled=False,
        store="memory://",
        datadir=str(faust_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee="exactly_once",
        # Faust's own consumer group: a killed worker's member must not hold it (and a restarted
        # worker's shutdown) for Faust's default 60 s.
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.session_timeout_ms / 3000,
    )
    for stage in stages(settings):
        app.service(service_for(TransactionalLoop(settings, stage)))
    if "analytics" in settings.stage_names:
        app.service(type("AnalyticsWorkerService", (AnalyticsService,), {"settings": settings}))
    return app
