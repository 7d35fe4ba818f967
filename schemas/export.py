"""Export the JSON Schema files under ``schemas/json/`` from the event models.

Run ``make schemas`` after changing ``schemas/events.py``; ``tests/unit/test_schemas.py`` fails while
the committed files differ from what this writes, so producers in any language validate the same
way Tally does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import BATCH_CONTENT_TYPE, EVENT_CLASSES, UsageEvent

JSON_DIR = Path(__file__).resolve().parent / "json"
SCHEMA_BASE = "urn:tally:schema:"


def _accept_numbers_for_decimals(node: Any) -> None:
    """msgspec documents Decimal as a string; the decoder reads a JSON number exactly as well."""
    if isinstance(node, dict):
        if node.get("format") == "decimal":
            node["type"] = ["string", "number"]
        for child in node.values():
            _accept_numbers_for_decimals(child)
    elif isinstance(node, list):
        for child in node:
            _accept_numbers_for_decimals(child)


def _schema(tp: Any, name: str, title: str) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(tp)
    _accept_numbers_for_decimals(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_BASE + name,
        "title": title,
        **schema,
    }


def rendered() -> dict[str, str]:
    """File name -> file text, for every exported schema."""
    files: dict[str, Any] = {}
    for cls in EVENT_CLASSES:
        event_type = str(cls.__struct_config__.tag)
        name = f"{event_type}.schema.json"
        files[name] = _schema(cls, name, f"Tally CloudEvent {event_type}")
    files["cloudevents-batch.schema.json"] = _schema(
        list[UsageEvent], "cloudevents-batch.schema.json", f"Tally CloudEvents batch ({BATCH_CONTENT_TYPE})"
    )
    return {name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in files.items()}


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (JSON_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {JSON_DIR / name}")  # a command's output


if __name__ == "__main__":
    main()
