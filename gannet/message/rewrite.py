"""Rewriting a finished message: prepend header fields, drop some of the existing ones.

After DATA, the inbound checks add Authentication-Results (and maybe an ARC
set, a DKIM-Signature, a quarantine mark) above everything else, and drop any
header field a filter rejects (a forged Authentication-Results claiming our
name). The body is either in memory (`InlineBody`) or already in an fsync'd
spool file (`SpooledBody`):

- in memory: a new bytes object;
- a file: a new file beside it (`NAME.rw`) gets the new lines, the filtered
  header section and then the rest of the old file, copied in 1 MiB chunks
  (memory stays bounded whatever the size); it is fsync'd and renamed over the
  old name, all in an executor. The store fsyncs the spool directory when it
  takes the file, as it does for any spool file. If anything fails, the old
  file is left as it was and the temporary one removed.

Only the header section is ever parsed, and only its first `MAX_HEADER_SECTION`
bytes: a header section longer than that is left as it is after that point.

Also `header_section()` / `header_fields()`: the raw fields of a message's
header (each field with its folded continuation lines), for the checks.

Never changes the body after the header section; never loses the old content
(the rename is the only switch).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gannet.queue.model import Body, InlineBody, SpooledBody

MAX_HEADER_SECTION = 1024 * 1024
COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FieldFilter:
    """Which header fields to drop: those named in `names` (lowercase) for which `drop`, given the
    raw field (b"Name: value\\r\\n\\tcontinued\\r\\n"), says True. The names let a header section
    that mentions none of them pass without being split into fields at all (the usual case:
    nothing is forged)."""

    names: frozenset[bytes]
    drop: Callable[[bytes], bool]

    def may_drop(self, head: bytes) -> bool:
        lowered = head.lower()
        return any(name in lowered for name in self.names)

    def __call__(self, field: bytes) -> bool:
        return field.partition(b":")[0].strip().lower() in self.names and self.drop(field)


def header_end(data: bytes) -> int:
    """Offset just past the blank line that ends the header section, or -1 if not within `data`."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else -1


def header_fields(section: bytes) -> list[bytes]:
    """Split a header section (without its blank line) into raw fields, CRLFs kept."""
    fields: list[bytes] = []
    start = 0
    pos = 0
    n = len(section)
    while pos < n:
        nl = section.find(b"\r\n", pos)
        line_end = n if nl < 0 else nl + 2
        if pos > start and section[pos : pos + 1] not in (b" ", b"\t"):
            fields.append(section[start:pos])
            start = pos
        pos = line_end
    if start < n:
        fields.append(section[start:n])
    return fields


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """(header section without the blank line, the rest from the blank line on)."""
    end = header_end(data[:MAX_HEADER_SECTION])
    if end < 0:  # no blank line within reach: treat what we have as headers up to the last CRLF
        cut = data.rfind(b"\r\n", 0, MAX_HEADER_SECTION) + 2 if b"\r\n" in data[:MAX_HEADER_SECTION] else 0
        return data[:cut], data[cut:]
    return data[: end - 2], data[end - 2 :]


def filter_head(head: bytes, drop: FieldFilter | None) -> tuple[bytes, int]:
    """The header section without the fields `drop` rejects, and how many were dropped."""
    if drop is None or not drop.may_drop(head):
        return head, 0
    kept = []
    dropped = 0
    for f in header_fields(head):
        if drop(f):
            dropped += 1
        else:
            kept.append(f)
    return (b"".join(kept), dropped) if dropped else (head, 0)


def rewrite_bytes(data: bytes, prepend: bytes, drop: FieldFilter | None = None) -> tuple[bytes, int]:
    head, rest = split_head(data)
    head, dropped = filter_head(head, drop)
    if not prepend and not dropped:
        return data, 0
    return prepend + head + rest, dropped


async def rewrite(body: Body, prepend: bytes, drop: FieldFilter | None = None) -> tuple[Body, int]:
    """`body` with `prepend` on top and the fields `drop` rejects removed: (new body, fields dropped)."""
    if not prepend and drop is None:
        return body, 0
    if isinstance(body, InlineBody):
        data, dropped = rewrite_bytes(body.data, prepend, drop)
        return (body if data is body.data else InlineBody(data)), dropped
    loop = asyncio.get_running_loop()
    size, dropped = await loop.run_in_executor(None, _rewrite_file, body.path, prepend, drop)
    return SpooledBody(body.path, size), dropped


async def read_head(body: Body, limit: int = MAX_HEADER_SECTION) -> bytes:
    """The start of the message (at most `limit` bytes): enough for its header section."""
    if isinstance(body, InlineBody):
        return body.data[:limit]
    return await asyncio.get_running_loop().run_in_executor(None, _read_start, body.path, limit)


async def read_all(body: Body) -> bytes:
    """The whole message in memory. Callers bound the size first."""
    if isinstance(body, InlineBody):
        return body.data
    return await asyncio.get_running_loop().run_in_executor(None, body.path.read_bytes)


def _read_start(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _rewrite_file(path: Path, prepend: bytes, drop: FieldFilter | None) -> tuple[int, int]:
    tmp = path.with_name(path.name + ".rw")
    try:
        with open(path, "rb") as src:
            start = src.read(MAX_HEADER_SECTION)
            head, rest = split_head(start)
            head, dropped = filter_head(head, drop)
            if not prepend and not dropped:  # nothing to change: keep the file as it is
                return os.fstat(src.fileno()).st_size, 0
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                size = out.write(prepend) + out.write(head) + out.write(rest)
                while chunk := src.read(COPY_CHUNK):
                    size += out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size, dropped
