"""`gannet sendmail` as programs use it: a real mail program (bsd-mailx, which runs
`sendmail -i -t` and writes To/Cc/Bcc headers) and the options cron, PHP and
scripts pass, against a real running Gannet; delivered copies are read back
from the Maildirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import peers
import pytest

Gannet = Callable[..., peers.GannetProcess]


def sendmail(
    g: peers.GannetProcess, *args: str, data: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`python -m gannet sendmail ARGS` with the message on stdin, config from $GANNET_CONFIG."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(peers.REPO),
        "GANNET_CONFIG": str(g.config_path),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "gannet", "sendmail", *args],
        input=data,
        capture_output=True,
        env=full_env,
        cwd="/",
        timeout=60,
        check=False,
    )


def wrapper(tmp_path: Path) -> Path:
    """A `sendmail` program for mail clients that run one by path."""
    path = tmp_path / "sendmail"
    path.write_text(f'#!/bin/sh\nPYTHONPATH={peers.REPO} exec {sys.executable} -m gannet sendmail "$@"\n')
    path.chmod(0o755)
    return path


def delivered(g: peers.GannetProcess, address: str, count: int = 1) -> list[bytes]:
    peers.wait_for(lambda: len(g.delivered(address)) >= count, 20, f"{count} message(s) for {address}")
    return [p.read_bytes() for p in sorted(g.delivered(address))]


def head(message: bytes) -> str:
    return message.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")


def test_bsd_mailx_sends_through_gannet_sendmail(gannet: Gannet, tmp_path: Path) -> None:
    mailx = peers.need("bsd-mailx")
    g = gannet()
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={wrapper(tmp_path)}\n")
    r = subprocess.run(
        [mailx, "-s", "from mailx", "-b", "bob@example.test", "alice@example.test"],
        input=b"hello from mailx\n",
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "MAILRC": str(rc), "GANNET_CONFIG": str(g.config_path)},
    )
    assert r.returncode == 0, r.stderr
    (to_alice,) = delivered(g, "alice@example.test")
    (to_bob,) = delivered(g, "bob@example.test")
    for copy in (to_alice, to_bob):
        h = head(copy)
        assert "Subject: from mailx" in h and "To: alice@example.test" in h
        assert "Bcc:" not in h, "Bcc is taken out before the message leaves sendmail"
        assert "Message-ID: <" in h and "Date: " in h and "From: " in h  # added: mailx writes none
        assert "Received: from localhost" in h
        assert b"hello from mailx" in copy


def test_recipients_sender_and_full_name_from_the_command_line(gannet: Gannet) -> None:
    g = gannet()
    r = sendmail(
        g,
        "-f",
        "robot@example.test",
        "-F",
        "Nightly Robot",
        "-odi",
        "-oem",
        "-bm",
        "-U",
        "--",
        "alice@example.test",
        data=b"Subject: report\n\nall good\n",
    )
    assert r.returncode == 0, r.stderr
    (copy,) = delivered(g, "alice@example.test")
    h = head(copy)
    assert "Return-Path: <robot@example.test>" in h
    assert "From: Nightly Robot <robot@example.test>" in h
    assert "Subject: report" in h and b"all good" in copy


def test_a_lone_dot_ends_input_unless_i_or_oi(gannet: Gannet) -> None:
    g = gannet()
    body = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert sendmail(g, "alice@example.test", data=body).returncode == 0
    (first,) = delivered(g, "alice@example.test")
    assert b"before" in first and b"after" not in first
    for flag in ("-i", "-oi"):
        assert sendmail(g, flag, "alice@example.test", data=body).returncode == 0
    copies = [c for c in delivered(g, "alice@example.test", 3) if b"after" in c]
    assert len(copies) == 2
    for copy in copies:
        assert b"before\n.\nafter" in copy, "the dot line is kept, not doubled (Maildir: LF ends)"


def test_t_takes_recipients_from_the_headers_and_drops_bcc(gannet: Gannet) -> None:
    g = gannet()
    data = (
        b"To: Alice <alice@example.test>\nCc: nobody-extra@example.test\nBcc: bob@example.test\n"
        b"Subject: t\n\nbody\n"
    )
    r = sendmail(g, "-t", "-i", data=data)
    assert r.returncode == 67, "an unknown Cc is refused at RCPT"
    assert "nobody-extra@example.test" in r.stderr.decode() and "nothing was sent" in r.stderr.decode()
    assert not g.delivered(), "all or nothing: nobody got it"
    r = sendmail(g, "-ti", data=data.replace(b"Cc: nobody-extra@example.test\n", b""))
    assert r.returncode == 0, r.stderr
    for address in ("alice@example.test", "bob@example.test"):
        (copy,) = delivered(g, address)
        assert "Bcc:" not in head(copy) and "To: Alice <alice@example.test>" in head(copy)


def test_a_bare_user_name_gets_the_first_local_domain(gannet: Gannet) -> None:
    g = gannet()
    assert sendmail(g, "alice", data=b"Subject: bare\n\nx\n").returncode == 0
    (copy,) = delivered(g, "alice@example.test")
    assert "Subject: bare" in head(copy)


def test_eight_bit_content_and_a_non_ascii_name(gannet: Gannet) -> None:
    g = gannet()
    r = sendmail(
        g,
        "-F",
        "Zoë Ångström",
        "-f",
        "zoe@example.test",
        "alice@example.test",
        data="Subject: café\n\nsmørrebrød\n".encode(),
    )
    assert r.returncode == 0, r.stderr
    (copy,) = delivered(g, "alice@example.test")
    assert "smørrebrød".encode() in copy
    assert "From: =?utf-8?" in head(copy)  # RFC 2047: a header is ASCII


def test_when_gannet_is_down_the_caller_is_told_to_try_later(gannet: Gannet) -> None:
    g = gannet(start=False)
    r = sendmail(g, "alice@example.test", data=b"Subject: x\n\nx\n")
    assert r.returncode == 75  # EX_TEMPFAIL: cron and friends keep the mail and retry
    host, port = g.address("mx")
    err = r.stderr.decode()
    assert f"gannet is not running on {host}:{port}" in err and "start it with `gannet serve`" in err
    assert "Traceback" not in err


def test_relaying_refused_from_an_untrusted_loopback(gannet: Gannet) -> None:
    g = gannet(relay={"trusted_networks": ["127.0.0.9/32"]})
    r = sendmail(g, "someone@remote.test", data=b"Subject: x\n\nx\n")
    assert r.returncode == 77  # EX_NOPERM
    assert "trusted_networks" in r.stderr.decode()


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        ((), 64, "no recipients"),
        (("-bp",), 64, "gannet queue list"),
        (("-q",), 64, "gannet queue retry --all"),
        (("-bs",), 64, "not supported"),
        (("-N", "sometimes", "a@b.test"), 64, "-N sometimes"),
        (("-Z", "a@b.test"), 64, "unknown option -Z"),
        (("-f",), 64, "-f needs a value"),
        (
            ("-C", "/nonexistent/gannet.toml", "a@b.test"),
            78,
            "cannot read the config /nonexistent/gannet.toml",
        ),
    ],
)
def test_usage_errors(gannet: Gannet, args: tuple[str, ...], status: int, says: str) -> None:
    g = gannet(start=False)
    r = sendmail(g, *args, data=b"Subject: x\n\nx\n")
    assert r.returncode == status
    assert says in r.stderr.decode()


def test_newaliases_mode_succeeds_and_says_why(gannet: Gannet) -> None:
    g = gannet(start=False)
    r = sendmail(g, "-bi", data=b"")
    assert r.returncode == 0 and "aliases" in r.stderr.decode()


def test_the_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "gannet-sendmail"]
    assert script.value == "gannet.admin.sendmail:main"
