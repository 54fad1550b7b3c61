"""buffer.py: line limits, strict CRLF, the DATA reader (dot-unstuffing, end marker,
smuggling), the BDAT reader, and bounded memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gannet.smtp import replies as R
from gannet.smtp.buffer import (
    AUTH_LINE_LIMIT,
    CHUNK,
    COMMAND_LINE_LIMIT,
    DONE,
    ChunkReader,
    DataReader,
    ReceiveBuffer,
)

Reader = DataReader | ChunkReader


def read_all(reader: Reader, rb: ReceiveBuffer) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        got = reader.read(rb)
        if got is None:
            return bytes(body), False
        if got is DONE:
            return bytes(body), True
        assert got, "empty chunks are never emitted"
        assert len(got) <= CHUNK + 4
        body += got


def feed_reader(
    make: Callable[[], Reader], data: bytes, step: int
) -> tuple[bytes, bool, Reader, ReceiveBuffer]:
    reader, rb = make(), ReceiveBuffer()
    body = bytearray()
    done = False
    for i in range(0, max(len(data), 1), step or len(data) or 1):
        rb.feed(data[i : i + (step or len(data))])
        got, done = read_all(reader, rb)
        body += got
        if done:
            break
    return bytes(body), done, reader, rb


def assert_reads(
    make: Callable[[], Reader], data: bytes, body: bytes, refusal: R.Reply | None = None
) -> None:
    """Habit 4 for the content readers: whole, byte by byte, and with trailing data.

    With a refusal, what was emitted before the problem was seen depends on
    the reads (the session discards it), so only the verdict is compared.
    """
    for step in (0, 1, 2, 7):
        got, done, reader, rb = feed_reader(make, data, step)
        assert done, f"step {step}: end not found"
        if refusal is None:
            assert got == body, f"step {step}: {got!r}"
        assert reader.refusal() == refusal
        assert len(rb) == 0
    got, done, reader, rb = feed_reader(make, data + b"MAIL FROM:<x@y>\r\n", 0)
    assert done and (refusal is not None or got == body)
    assert rb.next_line(COMMAND_LINE_LIMIT, False) == b"MAIL FROM:<x@y>"


def data_reader(max_size: int = 0, normalize: bool = False) -> Callable[[], Reader]:
    return lambda: DataReader(max_size, normalize)


def chunk_reader(
    size: int, last: bool = True, normalize: bool = False, max_size: int = 0
) -> Callable[[], Reader]:
    def make() -> Reader:
        reader = ChunkReader(max_size, normalize)
        reader.start(size, last)
        return reader

    return make


# -- command lines ----------------------------------------------------------------------


def lines(
    data: bytes, limit: int = COMMAND_LINE_LIMIT, normalize: bool = False, step: int = 0
) -> list[object]:
    rb = ReceiveBuffer()
    out: list[object] = []
    step = step or len(data)
    for i in range(0, len(data), step):
        rb.feed(data[i : i + step])
        while (line := rb.next_line(limit, normalize)) is not None:
            out.append(line)
        assert len(rb) <= limit
    return out


@pytest.mark.parametrize("step", [0, 1, 3])
def test_lines(step: int) -> None:
    assert lines(b"NOOP\r\nQUIT\r\n", step=step) == [b"NOOP", b"QUIT"]
    assert lines(b"\r\n", step=step) == [b""]
    assert lines(b"NOOP\r\nQUI", step=step) == [b"NOOP"]


@pytest.mark.parametrize("step", [0, 1, 100])
def test_line_limit(step: int) -> None:
    ok = b"X" * (COMMAND_LINE_LIMIT - 2) + b"\r\n"
    too_long = b"X" * (COMMAND_LINE_LIMIT - 1) + b"\r\n"
    assert lines(ok + b"NOOP\r\n", step=step) == [ok[:-2], b"NOOP"]
    assert lines(too_long + b"NOOP\r\n", step=step) == [R.R500_LINE_TOO_LONG, b"NOOP"]
    huge = b"Y" * 100_000 + b"\r\nNOOP\r\n"
    assert lines(huge, step=step or 4096) == [R.R500_LINE_TOO_LONG, b"NOOP"]


def test_auth_line_limit() -> None:
    line = b"A" * (AUTH_LINE_LIMIT - 2) + b"\r\n"
    assert lines(line, limit=AUTH_LINE_LIMIT) == [line[:-2]]
    assert lines(b"A" + line, limit=AUTH_LINE_LIMIT) == [R.R500_LINE_TOO_LONG]


@pytest.mark.parametrize("step", [0, 1])
def test_bare_newlines_in_commands(step: int) -> None:
    assert lines(b"NOOP\nQUIT\r\n", step=step) == [R.R500_BARE_LF, b"QUIT"]
    assert lines(b"NO\rOP\r\nQUIT\r\n", step=step) == [R.R500_BARE_LF, b"QUIT"]
    assert lines(b"NOOP\nQUIT\r\n", normalize=True, step=step) == [b"NOOP", b"QUIT"]
    # a bare CR is never a line end, and is refused even when normalizing
    assert lines(b"NOOP\rQUIT\r\n", normalize=True, step=step) == [R.R500_BARE_LF]


def test_clear_drops_everything() -> None:
    rb = ReceiveBuffer()
    rb.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert rb.next_line(COMMAND_LINE_LIMIT, False) == b"STARTTLS"
    rb.clear()
    assert len(rb) == 0
    assert rb.next_line(COMMAND_LINE_LIMIT, False) is None


# -- DATA -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b".\r\n", b""),  # empty body: the start counts as after CRLF
        (b"\r\n.\r\n", b"\r\n"),
        (b"hello\r\n.\r\n", b"hello\r\n"),
        (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),  # RFC 5321 §4.5.2
        (b"..x\r\n...\r\n.y\r\n.\r\n", b".x\r\n..\r\ny\r\n"),
        (b"a.\r\n.\r\n", b"a.\r\n"),
        (b"x\r\n..\r\n.\r\n", b"x\r\n.\r\n"),
        (b"no final newline.\r\n.\r\n", b"no final newline.\r\n"),
    ],
)
def test_data(data: bytes, body: bytes) -> None:
    assert_reads(data_reader(), data, body)


def test_long_lines_are_accepted() -> None:
    line = b"z" * 5000 + b"\r\n"
    assert_reads(data_reader(), line * 3 + b".\r\n", line * 3)


def test_big_body_is_chunked() -> None:
    body = (b"y" * 998 + b"\r\n") * 300  # 300 KB
    reader, rb = DataReader(0, False), ReceiveBuffer()
    rb.feed(body + b".\r\n")
    sizes = []
    while (got := reader.read(rb)) is not DONE:
        assert isinstance(got, bytes)
        sizes.append(len(got))
    assert sum(sizes) == len(body)
    assert max(sizes) <= CHUNK
    assert reader.size == len(body)


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n"]


@pytest.mark.parametrize("probe", SMUGGLING)
def test_smuggling_never_ends_data(probe: bytes) -> None:
    data = b"before" + probe + b"after\r\n.\r\n"
    # REJECT: read on to the real end, then refuse.
    assert_reads(data_reader(), data, b"", R.R554_BARE_LF)
    # NORMALIZE: one message, bare CR/LF made CRLF; the probe is content.
    got, done, _, rb = feed_reader(data_reader(normalize=True), data, 0)
    assert done and len(rb) == 0
    assert got.count(b"after") == 1 and got.endswith(b"after\r\n")
    crlf = got.count(b"\r\n")
    assert got.count(b"\r") == got.count(b"\n") == crlf


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n.\r\n", b"a\r\n\r\n"),
        (b"a\n\n.\r\n", b"a\r\n\r\n"),  # "\n" then ".\r\n": no CRLF before the dot
    ],
)
def test_normalize(data: bytes, body: bytes) -> None:
    if data == b"a\n\n.\r\n":
        data += b"\r\n.\r\n"
        body = b"a\r\n\r\n.\r\n\r\n"
    assert_reads(data_reader(normalize=True), data, body)


def test_data_size_limit() -> None:
    assert_reads(data_reader(max_size=10), b"0123456\r\n.\r\n", b"0123456\r\n")
    assert_reads(data_reader(max_size=10), b"0123456789\r\n.\r\n", b"", R.R552_TOO_BIG)


def test_data_memory_bounded() -> None:
    reader, rb = DataReader(1000, False), ReceiveBuffer()
    for _ in range(200):
        rb.feed(b"x" * 9998 + b"\r\n")  # every read ends in a held CRLF
        read_all(reader, rb)
        assert len(rb) <= 4
    rb.feed(b".\r\n")
    assert reader.read(rb) is DONE
    assert reader.refusal() == R.R552_TOO_BIG


def test_data_holds_back_a_possible_end() -> None:
    reader, rb = DataReader(0, False), ReceiveBuffer()
    rb.feed(b"abc\r\n.")
    assert reader.read(rb) == b"abc"
    assert reader.read(rb) is None
    rb.feed(b"\r")
    assert reader.read(rb) is None
    rb.feed(b"\n")
    assert reader.read(rb) == b"\r\n"
    assert reader.read(rb) is DONE


# -- BDAT -------------------------------------------------------------------------------


def test_bdat_reads_exact_octets() -> None:
    assert_reads(chunk_reader(8), b"..x\r\n.\r\n", b"..x\r\n.\r\n")  # raw: no unstuffing
    assert_reads(chunk_reader(0), b"", b"")


def test_bdat_cr_across_chunks() -> None:
    reader, rb = ChunkReader(0, False), ReceiveBuffer()
    reader.start(3, last=False)
    rb.feed(b"ab\r")
    got, done = read_all(reader, rb)
    assert (got, done) == (b"ab", True)
    reader.start(3, last=True)
    rb.feed(b"\ncd")
    got, done = read_all(reader, rb)
    assert (got, done) == (b"\r\ncd", True)
    assert reader.refusal() is None


@pytest.mark.parametrize("data", [b"a\nb", b"a\rb", b"ab\r"])
def test_bdat_bare_newlines(data: bytes) -> None:
    assert_reads(chunk_reader(len(data)), data, b"", R.R554_BARE_LF)
    got, done, reader, _ = feed_reader(chunk_reader(len(data), normalize=True), data, 0)
    assert done and reader.refusal() is None
    assert got.count(b"\r\n") == got.count(b"\r") == got.count(b"\n") == 1


def test_bdat_size_limit() -> None:
    assert_reads(chunk_reader(12, max_size=10), b"0123456789\r\n", b"", R.R552_TOO_BIG)
