"""Receive buffer: command lines with limits, the DATA reader, the BDAT reader.

Owns every decision about where one protocol unit ends in the byte stream:
line limits (RFC 5321 §4.5.3.1.4, RFC 4954 §4), strict CRLF, dot-unstuffing
and the end-of-data rule (RFC 5321 §4.5.2, §2.3.8), BDAT octet counting
(RFC 3030), and dropping all buffered input at STARTTLS (RFC 3207 §4.2,
CVE-2011-0411).

Invariants it must never break:
- only the raw sequence CRLF "." CRLF ends DATA; "\\n.\\n", "\\r.\\r",
  "\\r\\n.\\r", "\\n.\\r\\n", "\\r\\n.\\n" never do (SMTP smuggling,
  CVE-2023-51764/5/6), in either bare-newline mode;
- memory stays bounded: after a read, at most one command line (≤ limit) or
  4 octets of body are kept; body chunks are at most CHUNK octets;
- work is done on bulk bytes with find()/count()/replace(), never per byte.
It does no I/O and raises nothing on any input.
"""

from __future__ import annotations

import enum

from gannet.smtp.replies import R500_BARE_LF, R500_LINE_TOO_LONG, R552_TOO_BIG, R554_BARE_LF, Reply

COMMAND_LINE_LIMIT = 512  # RFC 5321 §4.5.3.1.4, CRLF included
AUTH_LINE_LIMIT = 12288  # RFC 4954 §4, CRLF included
CHUNK = 64 * 1024  # largest BodyChunk emitted

_END = b"\r\n.\r\n"


class BareNewline(enum.Enum):
    """What to do with a bare LF or bare CR (RFC 5321 §2.3.8)."""

    REJECT = "reject"  # command: 500; message: read to the end, then 554
    NORMALIZE = "normalize"  # Postfix 3.9 smtpd_forbid_bare_newline=normalize


class Done(enum.Enum):
    """Returned by the body readers when the content is complete."""

    DONE = "DONE"


DONE = Done.DONE


class ReceiveBuffer:
    """Bytes received and not yet consumed; `_pos` marks the consumed prefix."""

    __slots__ = ("_buf", "_discarding", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._discarding = False  # inside an over-long line: drop up to the next LF

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def clear(self) -> None:
        """RFC 3207 §4.2 / CVE-2011-0411: nothing sent before TLS survives it."""
        self._buf = bytearray()
        self._pos = 0
        self._discarding = False

    def next_line(self, limit: int, normalize: bool) -> bytes | Reply | None:
        """One line without its line end; a Reply (500) for a refused line; None: need data.

        A line longer than `limit` (line end included) is refused once and
        skipped up to the next LF, never buffered beyond `limit`.
        """
        buf = self._buf
        pos = self._pos
        if self._discarding:
            i = buf.find(b"\n", pos)
            if i < 0:
                self._pos = len(buf)
                return None
            pos = self._pos = i + 1
            self._discarding = False
        i = buf.find(b"\n", pos, pos + limit)
        if i < 0:
            if len(buf) - pos < limit:
                return None
            j = buf.find(b"\n", pos + limit)
            self._pos = len(buf) if j < 0 else j + 1
            self._discarding = j < 0
            return R500_LINE_TOO_LONG
        self._pos = i + 1
        if i > pos and buf[i - 1] == 13:  # CRLF
            line = bytes(buf[pos : i - 1])
        elif normalize:
            line = bytes(buf[pos:i])
        else:
            return R500_BARE_LF  # RFC 5321 §2.3.8: bare LF is not a line end
        if b"\r" in line:
            return R500_BARE_LF  # bare CR inside a command, refused in both modes
        return line

    def skip(self, n: int) -> int:
        """Drop up to n octets (a refused BDAT chunk); returns how many were dropped."""
        k = min(n, len(self._buf) - self._pos)
        self._pos += k
        return k

    def take(self, n: int) -> bytes:
        """Up to n octets (at most CHUNK), raw."""
        k = min(n, len(self._buf) - self._pos, CHUNK)
        start = self._pos
        self._pos = start + k
        return bytes(self._buf[start : start + k])

    def take_body(self, first: bool) -> tuple[bytes, bool] | None:
        """The next raw DATA segment and whether CRLF.CRLF ended it; None: need data.

        The segment ends at CRLF "." CRLF (the CRLF before the dot is part of
        the content), or before any tail that could begin that marker, so a
        segment never ends in "\\r", "\\r\\n", "\\r\\n." or "\\r\\n.\\r".
        `first`: nothing of this body has been consumed yet (the body start
        counts as following a CRLF, RFC 5321 §4.5.2).
        """
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if first and buf[pos : pos + 3] == b".\r\n":
            self._pos = pos + 3
            return b"", True
        end = min(size, pos + CHUNK)
        i = buf.find(_END, pos, end)
        if i >= 0:
            self._pos = i + 5
            return bytes(buf[pos : i + 2]), True
        cut = end - _hold_back(buf[max(pos, end - 4) : end])
        if first and cut > pos and bytes(buf[pos:end]) in (b".", b".\r"):
            cut = pos  # maybe the end marker of an empty body
        if cut <= pos:
            return None
        self._pos = cut
        return bytes(buf[pos:cut]), False


def _hold_back(tail: bytearray) -> int:
    """How many trailing octets could start CRLF.CRLF (or complete a CR-LF pair)."""
    if tail.endswith(b"\r\n.\r"):
        return 4
    if tail.endswith(b"\r\n."):
        return 3
    if tail.endswith(b"\r\n"):
        return 2
    if tail.endswith(b"\r"):
        return 1
    return 0


class _Content:
    """Per-message accounting shared by DATA and BDAT: size limit, bare CR/LF policy."""

    __slots__ = ("bare", "max_size", "normalize", "size", "too_big")

    def __init__(self, max_size: int, normalize: bool) -> None:
        self.max_size = max_size  # <= 0: unlimited
        self.normalize = normalize
        self.size = 0  # octets delivered in BodyChunks
        self.too_big = False
        self.bare = False  # REJECT mode saw a bare CR or LF

    def accept(self, seg: bytes) -> bytes:
        """Check/normalize one segment (never ending in a lone "\\r"); b"": suppress."""
        crlf = seg.count(b"\r\n")
        if seg.count(b"\r") != crlf or seg.count(b"\n") != crlf:
            if self.normalize:  # bare CR and bare LF each become CRLF
                seg = seg.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            else:
                self.bare = True
        if self.bare or self.too_big:
            return b""
        size = self.size + len(seg)
        if 0 < self.max_size < size:
            self.too_big = True
            return b""
        self.size = size
        return seg

    def refusal(self) -> Reply | None:
        if self.bare:
            return R554_BARE_LF
        if self.too_big:
            return R552_TOO_BIG
        return None


class DataReader(_Content):
    """DATA content: dot-unstuffed, ended by CRLF.CRLF only."""

    __slots__ = ("_done", "_first")

    def __init__(self, max_size: int, normalize: bool) -> None:
        super().__init__(max_size, normalize)
        self._first = True
        self._done = False

    def read(self, rb: ReceiveBuffer) -> bytes | Done | None:
        """A non-empty chunk of content, DONE after the end marker, None: need data."""
        if self._done:
            return DONE
        while True:
            got = rb.take_body(self._first)
            if got is None:
                return None
            seg, ended = got
            if seg:
                # RFC 5321 §4.5.2: a line starting with "." loses that dot.
                if self._first and seg[0] == 0x2E:
                    seg = seg[1:]
                if b"\r\n." in seg:
                    seg = seg.replace(b"\r\n.", b"\r\n")
                self._first = False
                seg = self.accept(seg)
            if ended:
                self._done = True
                return seg if seg else DONE
            if seg:
                return seg


class ChunkReader(_Content):
    """BDAT content (RFC 3030): exactly N octets per chunk, raw, no unstuffing.

    One reader lives for the whole transaction: the size limit and the bare
    CR/LF state span chunks, and a CR ending one chunk pairs with an LF
    starting the next.
    """

    __slots__ = ("_carry", "last", "remaining")

    def __init__(self, max_size: int, normalize: bool) -> None:
        super().__init__(max_size, normalize)
        self.remaining = 0
        self.last = False
        self._carry = b""  # a held "\r" whose successor is not yet known

    def start(self, size: int, last: bool) -> None:
        self.remaining = size
        self.last = last

    def read(self, rb: ReceiveBuffer) -> bytes | Done | None:
        while self.remaining:
            raw = rb.take(self.remaining)
            if not raw:
                return None
            self.remaining -= len(raw)
            seg = self._carry + raw
            self._carry = b""
            if seg[-1] == 13 and not (self.last and not self.remaining):
                self._carry = b"\r"
                seg = seg[:-1]
            if seg:
                seg = self.accept(seg)
                if seg:
                    return seg
        if self.last and self._carry:  # a final lone CR
            self._carry = b""
            seg = self.accept(b"\r")
            if seg:
                return seg
        return DONE
