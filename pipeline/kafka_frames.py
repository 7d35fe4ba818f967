"""Reading large Kafka responses without asyncio's growing-buffer copies.

aiokafka reads each response frame with ``StreamReader.readexactly(size)``. asyncio's reader
appends every socket read (<= 256 KiB) to one ``bytearray`` and returns once the whole frame is
there; the bytearray grows by 1/8 each time it is full, and each growth copies everything read so
far, so a frame is copied ~8 times before it is parsed. A poll's fetch response is up to
``fetch_total_bytes`` (32 MiB by default), so this ran at 1.05 GB/s (24 MiB frames fed in 256 KiB
reads, measured here) and took ~9% of the meter worker's thread in bench/meter's batch shape
(py-spy). ``LargeFrameReader`` copies each read once into a buffer of the frame's known size
(2.96 GB/s in the same measurement; ~0.5% of the thread); bench/meter batch read 77,700 against
74,500 events/s (median of 5 and 4 alternating runs, same hour).

``install()`` makes every aiokafka connection the process opens afterwards read with it: the
worker calls it at start (``pipeline.app.create_app``). Frames under ``LARGE_FRAME_BYTES`` take
asyncio's own path unchanged. If aiokafka stops creating its reader the way this expects,
``install`` leaves aiokafka alone and says so (the test suite fails on it: tests/integration/
test_kafka_frames.py), so an upgrade costs speed, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka.conn import AIOKafkaConnection

log = logging.getLogger(__name__)

# Below this a frame grows through a few copies at most: asyncio's own path is as fast.
LARGE_FRAME_BYTES = 1 << 20

# asyncio.StreamReader's internals this reads, as CPython 3.11 defines them (checked by ``installable``).
_READER_INTERNALS = ("_buffer", "_eof", "_exception", "_wait_for_data", "_maybe_resume_transport")


class LargeFrameReader(asyncio.StreamReader):
    """asyncio's reader, with ``readexactly`` copying a large frame once as its reads arrive.

    Unlike asyncio's, it takes bytes out of the buffer before the whole frame is there; if it is
    cancelled mid-frame those bytes are gone. aiokafka cancels a connection's read only when it
    closes the connection, and then every frame in flight is lost anyway.
    """

    _buffer: bytearray
    _eof: bool
    _exception: BaseException | None
    _wait_for_data: Callable[[str], Any]
    _maybe_resume_transport: Callable[[], None]

    # Frames read through the large path, by every reader of the process (tests and diagnostics).
    large_frames_read = 0

    async def readexactly(self, n: int) -> bytes:
        if n < LARGE_FRAME_BYTES or n <= len(self._buffer):
            return await super().readexactly(n)
        if self._exception is not None:
            raise self._exception
        frame = bytearray(n)
        view = memoryview(frame)
        filled = 0
        while True:
            buffer = self._buffer
            take = min(len(buffer), n - filled)
            if take:
                # The source view is a temporary, released before ``del`` resizes the buffer.
                view[filled : filled + take] = memoryview(buffer)[:take]
                del buffer[:take]
                filled += take
            if filled == n:
                self._maybe_resume_transport()
                LargeFrameReader.large_frames_read += 1
                # bytes, not the bytearray: aiokafka wraps the frame in a BytesIO, which shares a
                # bytes object's memory and would copy a bytearray once more.
                return bytes(frame)
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(frame[:filled]), n)
            await self._wait_for_data("readexactly")  # raises the stream's exception, if one is set


_stock_reader_task = AIOKafkaConnection._create_reader_task


def _reader_task_with_large_frames(self: AIOKafkaConnection) -> Any:
    reader = self._reader
    if type(reader) is asyncio.StreamReader:  # the class aiokafka's ``connect`` creates
        reader.__class__ = LargeFrameReader  # same layout: a subclass that adds no fields
    return _stock_reader_task(self)


def installable() -> bool:
    """Whether aiokafka and asyncio still have the hooks ``install`` relies on."""
    loop = asyncio.new_event_loop()  # a reader needs one; the caller may not have one yet
    try:
        reader = asyncio.StreamReader(loop=loop)
    finally:
        loop.close()
    return callable(getattr(AIOKafkaConnection, "_create_reader_task", None)) and all(
        hasattr(reader, name) for name in _READER_INTERNALS
    )


def install() -> bool:
    """Read large frames with ``LargeFrameReader`` on every aiokafka connection opened from now
    on; ``False`` (and a warning) if aiokafka changed so that it cannot. Idempotent."""
    if AIOKafkaConnection._create_reader_task is _reader_task_with_large_frames:
        return True
    if not installable():
        log.warning("kafka frames: aiokafka's connection reader is not as expected; left as it is")
        return False
    AIOKafkaConnection._create_reader_task = _reader_task_with_large_frames  # the one hook this module sets
    return True
