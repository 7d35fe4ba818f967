"""The Grafana dashboards' queries (deploy/grafana/dashboards/*.json), outside Grafana.

Tests and bench/analytics run every panel's SQL against the engine after expanding the
grafana-clickhouse-datasource macros the panels use, as the plugin expands them (its README):
- ``$__timeFilter(c)``: ``c >= toDateTime(<from>) AND c <= toDateTime(<to>)`` (epoch seconds);
- ``$__fromTime`` / ``$__toTime``: ``toDateTime(<from>)`` / ``toDateTime(<to>)``;
- ``$__timeInterval(c)``: ``toStartOfInterval(toDateTime(c), INTERVAL <interval> second)``;
- ``$__interval_s``: the panel's interval in seconds.
Panels read the rollups at the grain their range needs (minutes up to 6 hours, hours up to 3
days, days beyond): each grain is a branch of a UNION ALL whose range condition is constant, so
the engine reads one table only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from pipeline.settings import REPO_ROOT

DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCE_TYPE = "grafana-clickhouse-datasource"
_TIME_FILTER = re.compile(r"\$__timeFilter\(([^)]+)\)")
_TIME_INTERVAL = re.compile(r"\$__timeInterval\(([^)]+)\)")
_UNKNOWN = re.compile(r"\$__\w+")


@dataclass(frozen=True, slots=True)
class Panel:
    dashboard: str
    title: str
    kind: str  # timeseries or table
    sql: str


def panels() -> list[Panel]:
    """Every ClickHouse panel of every dashboard, in file and panel order."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] == DATASOURCE_TYPE:
                    found.append(Panel(dashboard["title"], panel["title"], panel["type"], target["rawSql"]))
    return found


def expand(sql: str, start: datetime, end: datetime, interval_s: int) -> str:
    """``sql`` with the plugin's macros replaced for the range ``start``..``end``."""
    first, last = int(start.timestamp()), int(end.timestamp())
    sql = _TIME_FILTER.sub(lambda m: f"{m[1]} >= toDateTime({first}) AND {m[1]} <= toDateTime({last})", sql)
    sql = _TIME_INTERVAL.sub(
        lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)", sql
    )
    sql = sql.replace("$__fromTime", f"toDateTime({first})").replace("$__toTime", f"toDateTime({last})")
    sql = sql.replace("$__interval_s", str(interval_s))
    unknown = _UNKNOWN.search(sql)
    if unknown:
        raise ValueError(f"macro {unknown[0]} is not one the dashboards may use")
    return sql
