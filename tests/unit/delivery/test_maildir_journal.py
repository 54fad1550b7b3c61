"""The rename journal (delivery/maildir_journal.py), on real Maildirs and a
real journal file: a batch answered after one syncfs, the renames' own syncfs
later, and after a crash the renames it lost finished from the journal."""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.delivery import maildir_journal
from gannet.delivery.maildir import SYNCFS_AVAILABLE, stage_checked
from gannet.delivery.maildir import syncfs as real_syncfs
from gannet.delivery.maildir_journal import RenameJournal

pytestmark = pytest.mark.skipif(not SYNCFS_AVAILABLE, reason="the journal needs syncfs")


def stage(root: Path, n: int) -> list[tuple[Path, int, int]]:
    def one(i: int) -> tuple[Path, int, int]:
        body = f"Subject: {i}\n\nbody {i}\n".encode()
        return stage_checked(root / f"u{i}", body, return_path="a@x.test", delivered_to=f"u{i}@x.test")

    return [one(i) for i in range(n)]


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The real syncfs, each call noted."""
    calls: list[Path] = []

    def counted(path: Path) -> None:
        calls.append(path)
        real_syncfs(path)

    monkeypatch.setattr(maildir_journal, "syncfs", counted)
    return calls


def lines(journal: Path) -> list[list[object]]:
    return [json.loads(line) for line in journal.read_bytes().splitlines() if line]


def test_a_batch_is_in_new_after_one_syncfs(tmp_path: Path, syncs: list[Path]) -> None:
    """The lines go in before the one syncfs, the renames after it; `settle`
    gives the renames their syncfs and empties the journal."""
    journal = RenameJournal(tmp_path / "renames")
    staged = stage(tmp_path / "mail", 3)
    results = journal.commit(staged)
    assert len(syncs) == 1 and journal.unsettled
    for (tmp, size, _), new in zip(staged, results, strict=True):
        assert new == tmp.parent.parent / "new" / tmp.name and isinstance(new, Path)
        assert not tmp.exists() and new.stat().st_size == size
    assert lines(tmp_path / "renames") == [[str(tmp), size, crc] for tmp, size, crc in staged]
    journal.settle()
    assert len(syncs) == 2 and not journal.unsettled
    assert (tmp_path / "renames").read_bytes() == b""
    journal.settle()
    assert len(syncs) == 2  # nothing to settle: no syncfs
    journal.close()


def test_replay_finishes_the_renames_a_crash_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer answered after the first syncfs and died; the power cut took
    the renames (here: moved back by hand). At the next start the files are
    found in tmp/ as written and moved into new/; the journal is emptied."""
    journal = RenameJournal(tmp_path / "renames")
    staged = stage(tmp_path / "mail", 2)
    for new in journal.commit(staged):
        assert isinstance(new, Path)
        os.rename(new, new.parent.parent / "tmp" / new.name)  # the lost rename
    caplog.set_level(logging.INFO, "gannet.delivery.local")
    assert maildir_journal.replay(tmp_path / "renames") == 2
    for tmp, size, _ in staged:
        new = tmp.parent.parent / "new" / tmp.name
        assert not tmp.exists() and new.stat().st_size == size
    assert (tmp_path / "renames").read_bytes() == b""
    assert "2 Maildir file(s) delivered before a crash moved from tmp/ into new/" in caplog.text


def test_replay_leaves_what_it_cannot_trust(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file whose content is not as written (its batch's syncfs never
    returned: never answered) stays in tmp/; a line cut short by the crash and
    a line whose file is gone (renamed long ago) are skipped; nothing fails."""
    (short, _, _), (done, _, _), (whole, size, crc) = stage(tmp_path / "mail", 3)
    short.write_bytes(short.read_bytes()[:5])
    os.rename(done, done.parent.parent / "new" / done.name)
    journal_file = tmp_path / "renames"
    journal_file.write_bytes(
        json.dumps([str(short), 99, 0]).encode() + b"\n"
        + json.dumps([str(done), 1, 2]).encode() + b"\n"
        + json.dumps([str(whole), size, crc]).encode() + b"\n"
        + b'["/mail/u9/tmp/cut sho'
    )  # fmt: skip
    assert maildir_journal.replay(journal_file) == 1
    assert short.exists() and not (short.parent.parent / "new" / short.name).exists()
    assert (whole.parent.parent / "new" / whole.name).exists()
    assert "left in tmp/: not as written" in caplog.text
    assert journal_file.read_bytes() == b""
    assert maildir_journal.replay(tmp_path / "none") == 0  # no journal yet: nothing to do


def test_a_failed_syncfs_answers_none_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error in the batch's syncfs: every file reported failed, removed
    from tmp/, none in new/ (the caller queues the recipients)."""
    journal = RenameJournal(tmp_path / "renames")
    staged = stage(tmp_path / "mail", 2)

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir_journal, "syncfs", failing)
    results = journal.commit(staged)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    for tmp, _, _ in staged:
        assert not tmp.exists() and list((tmp.parent.parent / "new").iterdir()) == []
    assert not journal.unsettled


def test_a_failed_settle_keeps_the_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The renames' syncfs fails: the lines stay for a later settle (or a replay)."""
    journal = RenameJournal(tmp_path / "renames")
    journal.commit(stage(tmp_path / "mail", 1))

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir_journal, "syncfs", failing)
    journal.settle()
    assert journal.unsettled and len(lines(tmp_path / "renames")) == 1
    assert "the syncfs after Maildir renames failed" in caplog.text
    monkeypatch.setattr(maildir_journal, "syncfs", real_syncfs)
    journal.close()
    assert (tmp_path / "renames").read_bytes() == b""


def test_the_journal_asks_for_a_settle_when_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir_journal, "LIMIT", 300)
    journal = RenameJournal(tmp_path / "renames")
    journal.commit(stage(tmp_path / "mail", 1))
    assert not journal.full
    journal.commit(stage(tmp_path / "mail", 3))
    assert journal.full
    journal.settle()
    assert not journal.full
    journal.close()


@pytest.mark.parametrize(
    "line",
    [
        b'["relative/tmp/x", 1, 2]',
        b'{"a": 1, "b": 2, "c": 3}',
        b'"abc"',
        b'["/m/new/x", 1, 2]',
        b'["/m/tmp/x", "1", 2]',
    ],
)
def test_replay_skips_lines_that_name_no_tmp_file(tmp_path: Path, line: bytes) -> None:
    (tmp_path / "renames").write_bytes(line + b"\n")
    assert maildir_journal.replay(tmp_path / "renames") == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_replay_never_fails_on_what_a_crash_leaves(data: bytes) -> None:
    """Whatever bytes the journal holds (a torn write, garbage after a lost
    truncate): replay finishes, moves nothing that is not a tmp/ file, and
    empties the journal."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "renames"
        journal.write_bytes(data)
        assert maildir_journal.replay(journal) == 0
        assert journal.read_bytes() == b""


def test_a_torn_line_does_not_hide_the_next_batch(tmp_path: Path) -> None:
    """A write cut short (a full disk) left half a line without its newline;
    the next batch's lines still parse, and replay finds their files."""
    journal_file = tmp_path / "renames"
    journal_file.write_bytes(b'["/mail/u0/tmp/half')
    journal = RenameJournal(journal_file)
    staged = stage(tmp_path / "mail", 1)
    (new,) = journal.commit(staged)
    assert isinstance(new, Path)
    os.rename(new, new.parent.parent / "tmp" / new.name)  # the rename lost in a crash
    assert maildir_journal.replay(journal_file) == 1
    assert new.exists()
