"""Queue IDs: format, order, uniqueness (gannet.queue.ids)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from gannet.queue import ids
from gannet.queue.ids import QueueIdGenerator, decode, encode, is_queue_id, new_queue_id, timestamp

ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{14}$")  # Crockford: no I, L, O, U


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_id_is_14_crockford_characters() -> None:
    for _ in range(1000):
        qid = new_queue_id()
        assert ID_RE.match(qid), qid
        assert is_queue_id(qid)


def test_ids_carry_their_millisecond_and_sort_by_time() -> None:
    clock = FakeClock(1_800_000_000.123)
    gen = QueueIdGenerator(clock)
    first = gen()
    assert timestamp(first) == pytest.approx(1_800_000_000.123, abs=0.001)
    clock.now += 0.001
    second = gen()
    clock.now += 86400
    third = gen()
    assert first < second < third
    assert timestamp(third) == pytest.approx(1_800_086_400.124, abs=0.002)


def test_ids_are_strictly_increasing_within_a_millisecond_and_when_the_clock_steps_back() -> None:
    clock = FakeClock(1_800_000_000.0)
    gen = QueueIdGenerator(clock)
    made = [gen() for _ in range(1000)]
    clock.now -= 5  # NTP stepped the clock back
    made += [gen() for _ in range(1000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_the_random_part_overflowing_borrows_the_next_millisecond() -> None:
    clock = FakeClock(1_800_000_000.0)
    gen = QueueIdGenerator(clock)
    first = decode(gen())
    millis = first >> 22
    gen._last = (millis << 22) | ((1 << 22) - 1)  # as if 4 million IDs were made this ms
    assert decode(gen()) >> 22 == millis + 1


def test_encode_and_decode_round_trip() -> None:
    for value in (0, 1, 31, 32, 1023, 1024, (1 << 70) - 1, 0x2AAAAAAAAAAAAAAAAA):
        assert decode(encode(value)) == value
    assert encode(0) == "0" * 14
    assert encode((1 << 70) - 1) == "Z" * 14


@pytest.mark.parametrize("bad", ["", "0" * 13, "0" * 15, "0000000000000I", "000000000000o0", "0" * 13 + "-"])
def test_decode_refuses_what_is_not_an_id(bad: str) -> None:
    assert not is_queue_id(bad)
    with pytest.raises(ValueError):
        decode(bad)


def test_ids_from_many_threads_are_unique() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(new_queue_id() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(out,)) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [qid for out in made for qid in out]
    assert len(set(everything)) == 20_000
    for out in made:
        assert out == sorted(out)


def test_two_generators_at_the_same_instant_differ() -> None:
    """Two nodes: independent generators, same millisecond; the random bits separate them."""
    clock = FakeClock(1_800_000_000.0)
    firsts = {QueueIdGenerator(clock)() for _ in range(200)}
    assert len(firsts) >= 199  # a clash is a 1-in-4-million draw per pair


def test_making_an_id_is_cheap() -> None:
    start = time.perf_counter()
    for _ in range(10_000):
        new_queue_id()
    assert (time.perf_counter() - start) / 10_000 < 50e-6  # ~2 µs here; generous for CI
    assert ids.ID_LENGTH == 14
