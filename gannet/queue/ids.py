"""Queue IDs: the name a message has from "250 2.0.0 queued as ID" to its removal.

Owns: the format and the generator. Called by the SMTP session (once per
accepted message, before it writes the Received header) and by delivery when
it creates a DSN. Pure CPU apart from reading the wall clock and `os.urandom`.

Format: 14 characters of Crockford base32 (digits and upper-case letters
without I, L, O, U), encoding 70 bits, most significant first:

    48 bits  milliseconds since the Unix epoch (good until the year 10889)
    22 bits  random, drawn afresh for each new millisecond

So an ID is safe in file names, in the Received header and on a command
line, and IDs sort (as strings) in the order they were made, to the
millisecond across nodes.

Invariants:
- Within one process the IDs are strictly increasing, hence unique: a second
  ID in the same millisecond (or after the clock stepped back) takes the
  previous one plus one (ULID's monotonic rule) instead of new random bits.
- Across processes and nodes uniqueness rests on the 22 random bits: two
  nodes would have to draw the same 4-million-to-one number in the same
  millisecond. The store's primary key is the last guard: a duplicate ID
  makes `enqueue` raise QueueError (the client is told 451 and retries).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 14
_RANDOM_BITS = 22
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_TIME_MASK = (1 << 48) - 1

# Two base32 characters per 10 bits: seven table look-ups build an ID.
_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)
_DECODE = {c: i for i, c in enumerate(ALPHABET)}


def encode(value: int) -> str:
    """The 14-character base32 form of a 70-bit integer."""
    p = _PAIRS
    return (
        p[(value >> 60) & 1023]
        + p[(value >> 50) & 1023]
        + p[(value >> 40) & 1023]
        + p[(value >> 30) & 1023]
        + p[(value >> 20) & 1023]
        + p[(value >> 10) & 1023]
        + p[value & 1023]
    )


def decode(queue_id: str) -> int:
    """The 70-bit integer of an ID. Raises ValueError if it is not one."""
    if len(queue_id) != ID_LENGTH:
        raise ValueError(f"a queue ID has {ID_LENGTH} characters: {queue_id!r}")
    value = 0
    try:
        for char in queue_id:
            value = (value << 5) | _DECODE[char]
    except KeyError:
        raise ValueError(f"not a queue ID: {queue_id!r}") from None
    return value


def is_queue_id(text: str) -> bool:
    """True if `text` has the form of a queue ID (for CLI/admin input checks)."""
    return len(text) == ID_LENGTH and all(c in _DECODE for c in text)


def timestamp(queue_id: str) -> float:
    """When the ID was made, in POSIX seconds (millisecond precision)."""
    return (decode(queue_id) >> _RANDOM_BITS) / 1000.0


class QueueIdGenerator:
    """Makes strictly increasing IDs. Thread-safe; one per process is enough.

    `clock` returns POSIX seconds; tests pass a fake one.
    """

    __slots__ = ("_clock", "_last", "_lock")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        millis = int(self._clock() * 1000) & _TIME_MASK
        with self._lock:
            last = self._last
            if millis > last >> _RANDOM_BITS:
                value = (millis << _RANDOM_BITS) | (int.from_bytes(os.urandom(3), "big") & _RANDOM_MASK)
            else:
                # Same millisecond, or the clock went back: stay monotonic.
                # Overflowing the random part just borrows the next millisecond.
                value = last + 1
            self._last = value
        return encode(value)


# The process-wide generator: uniqueness within a process needs one shared "last".
_generator = QueueIdGenerator()


def new_queue_id() -> str:
    """A fresh queue ID (see the module docstring for the guarantees)."""
    return _generator()
