"""LargeFrameReader returns exactly what asyncio's reader would, frame by frame, however the
bytes arrive; it fails as asyncio's does when the stream ends or breaks mid-frame."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest
from aiokafka.conn import AIOKafkaConnection
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import kafka_frames
from pipeline.kafka_frames import LARGE_FRAME_BYTES, LargeFrameReader

# Frame sizes around the threshold and a few MiB above it; reads of 3 bytes (a frame's size split
# across reads) to 512 KiB, cycled.
frame_sizes = st.lists(
    st.sampled_from(
        [0, 7, LARGE_FRAME_BYTES - 1, LARGE_FRAME_BYTES, LARGE_FRAME_BYTES + 1, 3 * LARGE_FRAME_BYTES]
    ),
    min_size=1,
    max_size=4,
)
read_sizes = st.lists(st.one_of(st.just(3), st.integers(4096, 512 * 1024)), min_size=1, max_size=8).filter(
    lambda reads: max(reads) > 3  # reads of 3 bytes alone would take minutes for 12 MiB
)


async def read_frames(stream: bytes, reads: list[int], frames: int) -> list[bytes]:
    """Feed ``stream`` in reads of the given sizes (cycled) while reading frames as aiokafka
    does: a 4-byte big-endian size, then the frame."""
    reader = LargeFrameReader(limit=2**16)

    async def feed() -> None:
        position, index = 0, 0
        while position < len(stream):
            size = reads[index % len(reads)]
            reader.feed_data(stream[position : position + size])
            position, index = position + size, index + 1
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    out = []
    for _ in range(frames):
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        out.append(await reader.readexactly(size))
    await feeder
    return out


@settings(max_examples=20, deadline=None)
@given(sizes=frame_sizes, reads=read_sizes)
def test_frames_come_back_whole_and_in_order(sizes: list[int], reads: list[int]) -> None:
    frames = [os.urandom(size) for size in sizes]
    stream = b"".join(struct.pack(">i", len(frame)) + frame for frame in frames)
    before = LargeFrameReader.large_frames_read
    got = asyncio.run(read_frames(stream, reads, len(frames)))
    assert got == frames
    assert all(type(frame) is bytes for frame in got)  # aiokafka's BytesIO shares bytes, copies bytearrays
    # Each frame of at least the threshold that was not already buffered took the large path.
    assert LargeFrameReader.large_frames_read - before <= sum(size >= LARGE_FRAME_BYTES for size in sizes)


def test_the_large_path_is_taken_for_a_frame_arriving_in_pieces() -> None:
    frame = os.urandom(2 * LARGE_FRAME_BYTES)
    before = LargeFrameReader.large_frames_read
    assert asyncio.run(read_frames(struct.pack(">i", len(frame)) + frame, [256 * 1024], 1)) == [frame]
    assert LargeFrameReader.large_frames_read == before + 1


def test_a_stream_ending_mid_frame_raises_with_what_arrived() -> None:
    async def run() -> None:
        reader = LargeFrameReader()
        reader.feed_data(b"a" * 300_000)
        reader.feed_eof()
        await reader.readexactly(2 * LARGE_FRAME_BYTES)

    with pytest.raises(asyncio.IncompleteReadError) as failure:
        asyncio.run(run())
    assert failure.value.partial == b"a" * 300_000
    assert failure.value.expected == 2 * LARGE_FRAME_BYTES


def test_a_broken_stream_raises_its_error_mid_frame() -> None:
    async def run() -> None:
        reader = LargeFrameReader()
        reader.feed_data(b"a" * 300_000)
        asyncio.get_running_loop().call_soon(reader.set_exception, ConnectionResetError("gone"))
        await reader.readexactly(2 * LARGE_FRAME_BYTES)

    with pytest.raises(ConnectionResetError, match="gone"):
        asyncio.run(run())


def test_install_needs_no_event_loop_in_the_calling_thread() -> None:
    """The worker installs before its loop exists (and uvloop's policy makes none on demand)."""
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(kafka_frames.install()))
    thread.start()
    thread.join()
    assert outcome == [True]
    assert AIOKafkaConnection._create_reader_task is kafka_frames._reader_task_with_large_frames
