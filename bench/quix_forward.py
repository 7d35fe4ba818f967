"""Peer figure: quix-streams' exactly-once 1:1 forward of the same single-event data.

Run by ``bench.ingest`` as a subprocess (quix-streams is a bench-only dependency, never imported by
Tally). Usage: ``python -m bench.quix_forward BROKER INPUT OUTPUT GROUP``.
"""

from __future__ import annotations

import sys

from quixstreams import Application


def main(broker: str, source: str, sink: str, group: str) -> None:
    app = Application(
        broker_address=broker,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        auto_create_topics=False,
        use_changelog_topics=False,
        loglevel="WARNING",
    )
    source_topic = app.topic(source, value_deserializer="bytes", key_deserializer="bytes")
    sink_topic = app.topic(sink, value_serializer="bytes", key_serializer="bytes")
    app.dataframe(source_topic).to_topic(sink_topic)
    app.run()


if __name__ == "__main__":
    main(*sys.argv[1:5])
