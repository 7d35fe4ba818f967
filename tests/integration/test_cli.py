"""The CLI against the real broker: `tally produce` publishes JSON lines, bad lines included."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec

from pipeline.loadgen import Expected, LoadPlan, default_now, generate
from pipeline.outputs import OutputReader, Outputs
from pipeline.testing import Worker, isolated_settings, settings_env


def test_produce_publishes_json_lines_and_bad_lines_reach_the_dead_letter_topic(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    expected = Expected()
    plan = LoadPlan(
        events=50, accounts=10, bad_fraction=0, duplicate_fraction=0, wrong_key_fraction=0, seed=5
    )
    lines = [m.value for m in generate(plan, default_now(), expected)]
    lines += [b'{"specversion": "1.0", "broken', b"", lines[0]]  # a bad line, a blank line, a duplicate
    tally = str(Path(sys.executable).with_name("tally"))
    worker = Worker(settings).start()

    async def read() -> Outputs:
        async with OutputReader(settings) as reader:
            await reader.start_from(await reader.snapshot())
            produced = await asyncio.to_thread(
                subprocess.run,
                [tally, "produce"],
                input=b"\n".join(lines) + b"\n",
                env=settings_env(settings),
                capture_output=True,
                check=True,
            )
            assert b"published 52 lines" in produced.stderr
            return await reader.read_until(51, idle_timeout_s=60, drain_s=2)

    try:
        outputs = asyncio.run(read())
    finally:
        worker.stop()
    assert set(outputs.identities) == expected.accepted
    assert outputs.repeated == {}
    assert dict(outputs.rejected) == {"malformed_json": 1}
    assert msgspec.json.decode(lines[0])["id"] in {ident for _, ident in outputs.identities}
