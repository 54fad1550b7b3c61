"""Length-prefixed frames on a byte stream: how Gannet talks to its own child processes.

A frame is a 4-byte big-endian length, then that many bytes; what the bytes
mean (marshal for the enqueue writer, pickle for the mailauth checker) is the
caller's, given as `decode`. Pure: no I/O. Both ends are always Gannet's own
processes on a private socketpair: never feed it bytes from the network.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, TypeVar

HEADER = struct.Struct("!I")

T = TypeVar("T")


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameBuffer(Generic[T]):
    """Bytes in, whole frames' decoded values out (a frame may arrive in pieces)."""

    def __init__(self, decode: Callable[[bytearray], T]) -> None:
        self._decode = decode
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[T]:
        buf = self._buf
        buf += data
        values = []
        start = 0
        while len(buf) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, start)
            end = start + HEADER.size + size
            if len(buf) < end:
                break
            values.append(self._decode(buf[start + HEADER.size : end]))
            start = end
        del buf[:start]
        return values

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame."""
        return len(self._buf)
