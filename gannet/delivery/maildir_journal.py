"""The rename journal of local delivery before the reply: one syncfs before the
250 instead of two.

A batch of Maildir files is made durable in two steps (maildir.commit_batch):
a syncfs for the files' data, each file renamed into new/, a syncfs for the
renames; the answer waits for both. With this journal it waits for the first
only. Before that syncfs, one line per staged file is appended to the
journal, a file on the same filesystem: the file's tmp/ path, size and
CRC-32. The one syncfs makes the data and the lines durable together; the
renames follow, and the answer. The renames become durable with the next
syncfs: the next batch's, or `settle`'s, which the enqueue writer calls once
it has been idle SETTLE_AFTER seconds (or the journal has grown past LIMIT
bytes, or it stops), and which then empties the journal.

After a crash, `replay` (when the enqueue writer starts, before it takes any
request) looks for each line's file. Still in tmp/ with the same size and
CRC-32: it was answered and its rename was lost; it goes into new/ now. In
tmp/ with other content: its batch's syncfs never returned, so it was never
answered (the client sends it again); it stays there, for the Maildir
reader's tmp/ cleanup. Gone from tmp/: its rename is done. Then one syncfs,
and the journal is emptied.

Why: with connections reused the enqueue writer's batch is about half of a
session's turn, and two fifths of that batch is the second syncfs. Measured
(bench/README.md, "Session 27").

Only files on the journal's filesystem use it (one syncfs must cover both);
the caller commits the others with the two syncfs.

Never: let a file be answered before the syncfs that followed its line
returned, or empty the journal before a syncfs that followed every rename it
names. A line it cannot parse (cut short by the crash) is skipped: its batch
was not answered.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from gannet.delivery.maildir import move_into_new, remove_staged, syncfs

log = logging.getLogger("gannet.delivery.local")

LIMIT = 1 << 20  # journal bytes after which the renames get their syncfs even under load
SETTLE_AFTER = 0.005  # idle seconds before the renames get their own syncfs


class RenameJournal:
    """One enqueue writer's journal file (one writer per SQLite queue), opened
    after `replay` has finished what a crash left in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(self._fd)
        self.device = stat.st_dev
        self._size = stat.st_size
        self.unsettled = False  # renames since the last syncfs that followed them all
        self._elsewhere_told = False  # the log line on Maildirs on another filesystem

    def shares(self, device: int) -> bool:
        """Whether files on `device` can use the journal (its filesystem: one
        syncfs covers both); the first time not, a log line says so."""
        if device == self.device:
            return True
        if not self._elsewhere_told:
            self._elsewhere_told = True
            log.info(
                "queue: Maildirs on another filesystem than %s: two syncfs a batch before the reply for them",
                self.path,
            )
        return False

    def commit(self, staged: Sequence[tuple[Path, int, int]]) -> list[Path | OSError]:
        """Files staged in tmp/ on the journal's filesystem, each with its size
        and CRC-32 (maildir.stage_checked): their lines, one syncfs, their
        renames into new/. Per file: its path in new/ (answerable now: durable
        with the next syncfs, or after a crash through `replay`), or the error
        (the file removed)."""
        if not staged:
            return []
        # Each line after a newline: should an earlier write have been cut
        # short (ENOSPC), its fragment cannot swallow this batch's first line.
        entries = [json.dumps([str(tmp), size, crc]).encode() for tmp, size, crc in staged]
        lines = b"\n" + b"\n".join(entries) + b"\n"
        try:
            _write_all(self._fd, lines)
            self._size += len(lines)
            syncfs(self.path)
        except OSError as exc:
            for tmp, _, _ in staged:
                remove_staged(tmp)
            return [exc] * len(staged)
        results: list[Path | OSError] = []
        for tmp, _, _ in staged:
            try:
                results.append(move_into_new(tmp))
            except OSError as exc:
                results.append(exc)
        self.unsettled = True
        return results

    @property
    def full(self) -> bool:
        return self._size >= LIMIT

    def settle(self) -> None:
        """A syncfs for the renames since the last one, then the journal emptied.
        If the syncfs fails the lines stay (a later settle, or replay, finishes)."""
        if not self.unsettled:
            return
        try:
            syncfs(self.path)
        except OSError as exc:
            log.error("queue: the syncfs after Maildir renames failed (%s); %s keeps them", exc, self.path)
            return
        os.ftruncate(self._fd, 0)
        self._size = 0
        self.unsettled = False

    def close(self) -> None:
        self.settle()
        os.close(self._fd)


def replay(path: Path) -> int:
    """Move into new/ every file the journal names that is still in tmp/ with
    its size and CRC-32; then syncfs and empty the journal. Returns how many
    were moved. OSError if the syncfs fails (the journal is kept)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if not data:
        return 0
    moved = 0
    for line in data.splitlines():
        tmp, size, crc = _parse(line)
        if tmp is None:
            continue  # cut short by the crash: its batch was not answered
        try:
            content = tmp.read_bytes()
        except FileNotFoundError:
            continue  # renamed into new/ (perhaps read and moved on since)
        except OSError as exc:
            log.error("queue: cannot read %s, named by %s (%s): move it into new/ by hand", tmp, path, exc)
            continue
        if len(content) != size or zlib.crc32(content) != crc:
            log.warning("queue: %s left in tmp/: not as written (its batch was not answered)", tmp)
            continue
        try:
            os.rename(tmp, tmp.parent.parent / "new" / tmp.name)
        except OSError as exc:  # never remove it: it may have been answered
            log.error("queue: cannot move %s into new/ (%s): move it by hand", tmp, exc)
            continue
        moved += 1
    syncfs(path)  # the renames durable before the lines that name them go
    os.truncate(path, 0)
    if moved:
        log.info("queue: %d Maildir file(s) delivered before a crash moved from tmp/ into new/", moved)
    return moved


def _parse(line: bytes) -> tuple[Path | None, int, int]:
    """A journal line's file in a tmp/ directory, size and CRC-32; (None, 0, 0) if it is not one."""
    try:
        name, size, crc = json.loads(line)
    except (ValueError, TypeError):
        return None, 0, 0
    if not (isinstance(name, str) and isinstance(size, int) and isinstance(crc, int)):
        return None, 0, 0
    tmp = Path(name)
    return (tmp, size, crc) if tmp.is_absolute() and tmp.parent.name == "tmp" else (None, 0, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
