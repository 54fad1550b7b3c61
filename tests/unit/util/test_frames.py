"""gannet/util/frames.py: length-prefixed frames, however the stream is cut into reads."""

from __future__ import annotations

import pytest

from gannet.util import frames


@pytest.mark.parametrize("cut", range(1, 30))
def test_frames_come_out_whole_however_the_stream_is_cut(cut: int) -> None:
    stream = b"".join(frames.frame(p) for p in [b"", b"ab", b"x" * 9])
    buffer = frames.FrameBuffer(bytes)
    got = [f for start in range(0, len(stream), cut) for f in buffer.feed(stream[start : start + cut])]
    assert got == [b"", b"ab", b"x" * 9]
    assert buffer.pending == 0
