"""Maildir writing: layout, names, content, durability calls, and the
path-traversal guard of maildir_path."""

from __future__ import annotations

import os
import re
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gannet.delivery import maildir as md
from gannet.delivery.maildir import deliver_to_maildir, maildir_path

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nline one\r\nline two\r\n"
NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^/,]+),S=(\d+)$")


def deliver(box: Path, content: bytes = MESSAGE, sender: str = "a@remote.test") -> Path:
    return deliver_to_maildir(box, content, return_path=sender, delivered_to="bob@example.test")


def test_creates_tmp_new_cur_0700_and_puts_the_file_in_new(tmp_path: Path) -> None:
    box = tmp_path / "mail" / "example.test" / "bob"
    path = deliver(box)
    assert path.parent == box / "new"
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((box / sub).stat().st_mode) == 0o700
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "cur") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_content_is_lf_with_return_path_and_delivered_to_first(tmp_path: Path) -> None:
    path = deliver(tmp_path / "box")
    assert path.read_bytes() == (
        b"Return-Path: <a@remote.test>\n"
        b"Delivered-To: bob@example.test\n"
        b"Subject: hi\nMessage-ID: <1@x>\n\nline one\nline two\n"
    )


def test_null_sender_is_an_empty_return_path(tmp_path: Path) -> None:
    path = deliver(tmp_path / "box", sender="")
    assert path.read_bytes().startswith(b"Return-Path: <>\n")


def test_utf8_addresses_are_written_as_utf8(tmp_path: Path) -> None:
    path = deliver(tmp_path / "box", sender="josé@exämple.test")
    assert path.read_bytes().startswith("Return-Path: <josé@exämple.test>\n".encode())


def test_header_values_cannot_inject_lines(tmp_path: Path) -> None:
    path = deliver(tmp_path / "box", sender="a@x\r\nX-Evil: 1")
    head = path.read_bytes().split(b"\n")[0]
    assert head == b"Return-Path: <a@xX-Evil: 1>"


def test_name_has_the_maildir_shape_and_s_is_the_file_size(tmp_path: Path) -> None:
    path = deliver(tmp_path / "box")
    m = NAME.match(path.name)
    assert m, path.name
    assert int(m.group(3)) == os.getpid()
    assert int(m.group(6)) == path.stat().st_size


def test_hostname_special_characters_are_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    md._hostname.cache_clear()
    monkeypatch.setattr(socket, "gethostname", lambda: "a/b:c,d")
    try:
        assert md._hostname() == r"a\057b\072c\054d"
    finally:
        md._hostname.cache_clear()


def test_names_are_unique_across_threads(tmp_path: Path) -> None:
    box = tmp_path / "box"
    deliver(box)  # create the tree once, so the threads race only on names
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: deliver(box), range(400)))
    assert len({p.name for p in paths}) == 400
    assert len(os.listdir(box / "new")) == 401


def test_fsyncs_file_and_new_dir_and_the_parents_of_created_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    box = tmp_path / "mail" / "example.test" / "bob"
    first = deliver(box)
    # New tree: each created directory's parent, then the file, then new/.
    assert set(synced[:-2]) == {str(tmp_path), str(tmp_path / "mail"),
                                str(tmp_path / "mail" / "example.test"), str(box)}
    assert synced[-2].startswith(str(box / "tmp"))
    assert synced[-1] == str(box / "new")
    assert first.exists()

    synced.clear()
    deliver(box)
    assert len(synced) == 2  # existing tree: the file, then new/
    assert synced[0].startswith(str(box / "tmp")) and synced[1] == str(box / "new")


def test_stage_leaves_the_new_dir_fsync_to_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = tmp_path / "box"
    deliver(box)
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    path = md.stage_in_maildir(box, b"x\n", return_path="", delivered_to="bob@example.test")
    assert path.parent == box / "new" and path.exists()
    assert len(synced) == 1  # the file only


def test_repairs_a_maildir_missing_new(tmp_path: Path) -> None:
    box = tmp_path / "box"
    (box / "tmp").mkdir(parents=True)
    path = deliver(box)
    assert path.parent == box / "new" and (box / "cur").is_dir()
    assert os.listdir(box / "tmp") == []


def test_a_file_in_the_path_is_an_oserror_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "mail").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        deliver(tmp_path / "mail" / "example.test" / "bob")
    assert (tmp_path / "mail").read_text() == "not a directory"


def test_a_failed_write_removes_its_tmp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = tmp_path / "box"
    deliver(box)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        deliver(box)
    assert os.listdir(box / "tmp") == []
    assert len(os.listdir(box / "new")) == 1


# -- maildir_path: the traversal guard -------------------------------------------

TEMPLATE = "/var/mail/{domain}/{user}"


def test_maildir_path_fills_the_template_and_lowercases_the_domain() -> None:
    assert maildir_path(TEMPLATE, "Alice@Example.TEST") == Path("/var/mail/example.test/Alice")
    assert maildir_path(TEMPLATE, "bob@example.test.") == Path("/var/mail/example.test/bob")
    assert maildir_path(TEMPLATE, "\"odd\"@example.test") == Path('/var/mail/example.test/"odd"')
    assert maildir_path(TEMPLATE, "josé@exämple.test") == Path("/var/mail/exämple.test/josé")
    assert maildir_path("/m/{user}.{domain}", "a.b@x") == Path("/m/a.b.x")


@pytest.mark.parametrize(
    "mailbox",
    [
        "../etc@example.test",
        "..@example.test",
        ".@example.test",
        ".hidden@example.test",
        "a..b@example.test",
        "a/b@example.test",
        "bob@../../etc",
        "bob@example.test/..",
        "bob@..",
        "bob@.example.test",
        "nul\x00@example.test",
        "new\nline@example.test",
        "@example.test",
        "bob@",
        "no-domain",
        "",
        "x" * 256 + "@example.test",
        "\ud800@example.test",
    ],
)
def test_maildir_path_refuses_unsafe_names(mailbox: str) -> None:
    with pytest.raises(ValueError):
        maildir_path(TEMPLATE, mailbox)


@pytest.mark.parametrize("fsync", [True, False])
def test_stage_file_streams_crlf_to_lf_across_piece_boundaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    monkeypatch.setattr(md, "STREAM_CHUNK", 7)  # pieces end inside CRLFs, and on CRs
    source = tmp_path / "body"
    content = b"Subject: s\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(200)) + b"bare\rcr\r\n"
    source.write_bytes(content)
    path = md.stage_file(tmp_path / "box", source, return_path="a@b.test", delivered_to="c@d.test",
                         fsync=fsync)
    assert path.parent.name == ("new" if fsync else "tmp")
    data = path.read_bytes()
    assert data == b"Return-Path: <a@b.test>\nDelivered-To: c@d.test\n" + content.replace(b"\r\n", b"\n")
    assert path.name.endswith(f",S={len(data)}")
