"""`gannet sendmail`'s pure parts: the option syntax programs use, reading the
message (dots, line ends, mbox "From "), -t, Bcc removal and added headers.
The SMTP side against a real Gannet is in tests/interop/test_sendmail.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gannet.admin.sendmail import Target, Usage, parse_args, prepare, read_message, split_message

TARGET = Target("127.0.0.1", 2525, "mx.example.test", "example.test", Path("/etc/gannet/gannet.toml"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "-i"], {"from_headers": True, "dot_ends": False}),
        (["-ti"], {"from_headers": True, "dot_ends": False}),
        (["-oi", "a@b.test"], {"dot_ends": False, "recipients": ["a@b.test"]}),
        (["-fbob@x.test", "a@b.test"], {"sender": "bob@x.test"}),
        (["-f", "<bob@x.test>", "a@b.test"], {"sender": "bob@x.test"}),
        (["-f", "<>", "a@b.test"], {"sender": ""}),
        (["-r", "bob@x.test"], {"sender": "bob@x.test"}),
        (["-F", "Cron Daemon", "root"], {"full_name": "Cron Daemon", "recipients": ["root"]}),
        (["-FCron"], {"full_name": "Cron"}),
        (["--", "-strange@b.test"], {"recipients": ["-strange@b.test"]}),
        (
            [
                "-odi",
                "-oem",
                "-oee",
                "-bm",
                "-U",
                "-m",
                "-n",
                "-em",
                "-B",
                "8BITMIME",
                "-L",
                "x",
                "-h",
                "3",
                "a@b",
            ],
            {"recipients": ["a@b"], "dot_ends": True},
        ),
        (
            ["-N", "success,failure", "-R", "hdrs", "-V", "env 1"],
            {"notify": "SUCCESS,FAILURE", "ret": "HDRS", "envid": "env 1"},
        ),
        (["-C", "/tmp/g.toml"], {"config": "/tmp/g.toml"}),
        (["--config", "/tmp/g.toml"], {"config": "/tmp/g.toml"}),
        (["-v"], {"verbose": True}),
        (["-bi"], {"newaliases": True}),
    ],
)
def test_options(argv: list[str], expected: dict[str, object]) -> None:
    opts = parse_args(argv)
    assert {k: getattr(opts, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-bp"], "gannet queue list"),
        (["-q"], "retry --all"),
        (["-q30m"], "retry --all"),
        (["-bs"], "not supported"),
        (["-f"], "-f needs a value"),
        (["-x"], "unknown option -x"),
        (["-N", "never,success"], "give never"),
        (["-R", "all"], "full or hdrs"),
    ],
)
def test_refused_options(argv: list[str], says: str) -> None:
    with pytest.raises(Usage, match=says.replace("-", r"\-")):
        parse_args(argv)


def test_a_lone_dot_ends_input_unless_told_otherwise() -> None:
    data = b"Subject: x\n\nline\n.\nmore\n"
    assert read_message(io.BytesIO(data), dot_ends=True) == b"Subject: x\r\n\r\nline\r\n"
    assert read_message(io.BytesIO(data), dot_ends=False) == b"Subject: x\r\n\r\nline\r\n.\r\nmore\r\n"
    assert (
        read_message(io.BytesIO(b"a\r\n..\r\nb\r\n"), dot_ends=True) == b"a\r\n..\r\nb\r\n"
    )  # not a lone dot


def test_line_ends_become_crlf_and_an_mbox_from_line_is_dropped() -> None:
    data = b"From someone Mon Jan 1 00:00:00 2026\nSubject: x\r\n\rbody\n"
    assert read_message(io.BytesIO(data), dot_ends=False) == b"Subject: x\r\n\r\nbody\r\n"


def test_folded_headers_stay_whole() -> None:
    fields, body = split_message(b"To: a@b.test,\r\n c@d.test\r\nSubject: s\r\n\r\nbody\r\n")
    assert fields == [b"To: a@b.test,\r\n c@d.test", b"Subject: s"] and body == b"body\r\n"
    assert split_message(b"just text\r\n") == ([], b"just text\r\n")


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    opts = parse_args(["-t", "extra@b.test"])
    data = (
        b"To: A <a@b.test>, c@d.test\r\nCc: e@f.test\r\nBcc: secret@g.test,\r\n hidden@g.test\r\n"
        b"From: me@example.test\r\nDate: Mon, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n"
    )
    message, recipients = prepare(data, opts, "me@example.test", TARGET)
    assert recipients == [
        "extra@b.test",
        "a@b.test",
        "c@d.test",
        "e@f.test",
        "secret@g.test",
        "hidden@g.test",
    ]
    assert b"Bcc" not in message and b"hidden" not in message
    assert message.endswith(b"Message-ID: <1@x>\r\n\r\nhi\r\n")  # nothing added: all there


def test_missing_headers_are_added_and_bare_names_get_the_origin() -> None:
    opts = parse_args(["-F", "Zoë", "root", "a@b.test, c@d.test"])
    message, recipients = prepare(b"Subject: s\r\n\r\nhi\r\n", opts, "cron@example.test", TARGET)
    assert recipients == ["root@example.test", "a@b.test", "c@d.test"]
    head = message.split(b"\r\n\r\n")[0].decode()
    assert "From: =?utf-8?" in head and "<cron@example.test>" in head
    assert "\r\nDate: " in head and "\r\nMessage-ID: <" in head and "@mx.example.test>" in head


def test_a_message_with_no_header_gets_one() -> None:
    message, _ = prepare(b"only a body\r\n", parse_args(["-F", "", "a@b.test"]), "", TARGET)
    assert message.startswith(b"From: MAILER-DAEMON\r\nDate: ")  # the null sender: no address to show
    assert message.endswith(b"\r\n\r\nonly a body\r\n")
