"""The DKIM body hash (bh=) of a message body read in pieces: relaxed canonicalization, streamed.

Signing a message larger than `[mailauth] max_verify_size` must not load it:
its body is read from the spool file in chunks (in an executor) and fed to
`RelaxedBodyHash`, which gives the SHA-256 of exactly the bytes
`signing.relaxed_body()` (and dkimpy's `Relaxed`) would produce for the whole
body (RFC 6376 §3.4.4):

- whitespace at the end of each line is removed, and each run of spaces and
  tabs inside a line becomes one space: done per complete line, so a run is
  never cut in two by a chunk boundary;
- empty lines at the end are ignored: a run of CRLFs is held back until
  something other than empty lines follows it;
- a last line without CRLF is kept as it is (only its runs compressed) and
  gets one CRLF, as dkimpy does.

Memory is bounded by the chunk size plus `max_line`: a longer line without
CRLF is hashed as far as its end cannot change it, so even a body that is
one huge line costs no more.

Pure computation; never raises for any content.
"""

from __future__ import annotations

import hashlib
import re

_WSP_TO_COMPRESS = re.compile(rb"[\t ]{2,}|\t")  # a lone space is already canonical
_CRLF = b"\r\n"


def _compress(data: bytes) -> bytes:
    return _WSP_TO_COMPRESS.sub(b" ", data) if b"\t" in data or b"  " in data else data


class RelaxedBodyHash:
    def __init__(self, max_line: int = 64 * 1024) -> None:
        self._hash = hashlib.sha256()
        self._max_line = max_line
        self._tail = b""  # the start of a line whose CRLF has not arrived yet
        self._held = 0  # CRLFs not hashed yet: they end the body unless more text follows
        self._started = False  # any text hashed (an empty canonical body has no final CRLF)

    def update(self, data: bytes) -> None:
        data = self._tail + data if self._tail else data
        cut = data.rfind(_CRLF)
        if cut < 0:
            self._tail = data
        else:
            self._tail = data[cut + 2 :]
            lines = data[: cut + 2].split(_CRLF)
            lines.pop()  # after the last CRLF: b""
            self._emit(_compress(_CRLF.join([line.rstrip(b" \t") for line in lines]) + _CRLF))
        if len(self._tail) > self._max_line:
            self._flush_long_line()

    def _emit(self, text: bytes) -> None:
        """Hash canonical text, holding back the CRLFs it ends with."""
        end = len(text)
        while text.endswith(_CRLF, 0, end):
            end -= 2
        if end == 0:
            self._held += len(text) // 2
            return
        self._hash.update(_CRLF * self._held + text[:end])
        self._held = (len(text) - end) // 2
        self._started = True

    def _flush_long_line(self) -> None:
        """Hash a long unfinished line up to where what follows can no longer change it: all but
        its trailing blanks (removed if a CRLF follows, else one space) and a final CR (maybe
        half a CRLF). What is kept is at most a space and a CR."""
        tail = self._tail
        cr = tail.endswith(b"\r")
        line = tail[:-1] if cr else tail
        keep = len(line.rstrip(b" \t"))
        if keep:
            self._emit(_compress(line[:keep]))
        self._tail = (b" " if keep < len(line) else b"") + (b"\r" if cr else b"")

    def digest(self) -> bytes:
        """The SHA-256 of the canonical body (call once, after the last `update`)."""
        if self._tail:
            self._hash.update(_CRLF * self._held + _compress(self._tail) + _CRLF)
        elif self._started:
            self._hash.update(_CRLF)
        return self._hash.digest()
