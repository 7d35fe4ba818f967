"""The Faust app factory: ``tally worker`` runs this app.

The stateless ingest stage and the dedupe stage run as services inside the Faust app on aiokafka
directly (DESIGN.md throughput rule 4, and docs/ARCHITECTURE.md for why dedupe does too): Faust's
per-message path costs ~75 us and its tables write one changelog record per assignment, where these
stages need one transaction and one changelog record per poll. Faust agents join this app for the
windowed stages that follow (issue 4); they read batch messages only.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from mode import Service

from agents.ingest import IngestStage
from agents.ledger import LedgerStage
from agents.meter import MeterStage
from pipeline.settings import Settings
from pipeline.transactional import Stage, TransactionalLoop

log = logging.getLogger(__name__)

# How often each stage logs its counters.
REPORT_INTERVAL_S = 10.0
# Longest wait for a stage to finish its transaction in flight when the worker stops.
STOP_TIMEOUT_S = 30.0


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


def stages(settings: Settings) -> list[Stage]:
    return [IngestStage(settings), MeterStage(settings), LedgerStage(settings)]


def create_app(settings: Settings) -> faust.App:
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
    return app
