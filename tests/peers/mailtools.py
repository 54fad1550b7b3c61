"""Mail client programs run to completion: smtp-source, swaks and OpenDKIM's signer.

Each runs one command with a timeout and returns what it printed; none starts
anything that outlives the call, and none talks to anything but the target given.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .base import PeerError, need


class SourceResult(subprocess.CompletedProcess[str]):
    """smtp-source's CompletedProcess plus ``elapsed`` (wall seconds) and ``argv``."""

    elapsed: float = 0.0


def smtp_source(
    target: str,
    *,
    messages: int,
    sessions: int = 1,
    keep_connection: bool = False,
    size: int = 4096,
    sender: str = "source@client.test",
    recipient: str = "alice@example.test",
    recipients: int = 1,
    helo: str = "client.test",
    subject: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 600,
    check: bool = True,
) -> SourceResult:
    """Run Postfix's smtp-source against ``target`` (``host:port``) and time it.

    Flags: ``-s sessions -m messages -l size -f sender -t recipient -M helo``;
    ``keep_connection`` adds ``-d`` (each session sends all its messages over
    one connection; smtp-source has no "N per connection" option);
    ``recipients > 1`` adds ``-r N`` (smtp-source then prefixes a number to the
    recipient: ``1alice@…``, so the server must accept those). smtp-source
    writes headers From, To, Date and ``Message-Id: <PID.FD.COUNT@helo>``:
    unique within one run (COUNT counts down over the whole run).
    It stops at the first reply it does not expect, with status 1;
    ``check=True`` turns that into PeerError.
    """
    program = need("smtp-source")
    argv = [
        program,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        sender,
        "-t",
        recipient,
        "-M",
        helo,
    ]
    if keep_connection:
        argv.append("-d")
    if recipients > 1:
        argv += ["-r", str(recipients)]
    if subject:
        argv += ["-S", subject]
    argv += [*extra_args, target]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"smtp-source did not finish within {timeout:.0f}s: {' '.join(argv)}") from exc
    result = SourceResult(argv, done.returncode, done.stdout, done.stderr)
    result.elapsed = time.monotonic() - started
    if check and result.returncode != 0:
        raise PeerError(
            f"smtp-source exited {result.returncode}: {' '.join(argv)}\n{result.stdout}{result.stderr}"
        )
    return result


def opendkim_sign(
    workdir: Path,
    message: bytes,
    *,
    domain: str,
    selector: str,
    key_file: Path,
    algorithm: str = "rsa-sha256",
    canonicalization: str = "relaxed/simple",
) -> bytes:
    """``message`` signed by OpenDKIM itself: the ``opendkim`` filter in test mode (``-t``),
    which signs as the milter would and prints the header it would insert. (OpenDKIM's
    ``opendkim-testmsg`` signs only with rsa-sha1, which RFC 8301 forbids verifiers to accept.)
    ``algorithm``: rsa-sha256 or ed25519-sha256 (an Ed25519 key as PKCS#8 PEM)."""
    program = need("opendkim")
    workdir.mkdir(parents=True, exist_ok=True)
    conf, msg = workdir / f"opendkim-{selector}.conf", workdir / f"opendkim-{selector}.eml"
    conf.write_text(
        f"Domain {domain}\nSelector {selector}\nKeyFile {key_file}\n"
        f"SignatureAlgorithm {algorithm}\nCanonicalization {canonicalization}\n"
        "Mode s\nSyslog no\nRequireSafeKeys no\n"
    )
    msg.write_bytes(message)
    done = subprocess.run(
        [program, "-x", str(conf), "-t", str(msg), "-vv"], capture_output=True, timeout=60, check=False
    )
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    m = re.search(r"### INSHEADER: idx=\d+ hname='([^']+)' hvalue='([^']*)'", out)
    if m is None:
        raise PeerError(f"opendkim did not sign (exit {done.returncode}):\n{out[-2000:]}")
    value = m.group(2).replace("\r\n", "\n").replace("\n", "\r\n")
    return f"{m.group(1)}: {value}\r\n".encode() + message


def swaks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run swaks with ``args``; the transcript is in ``.stdout``. Never raises on exit status.

    swaks' exit status says where it stopped: 0 all accepted, 23 at MAIL,
    24 at RCPT, 25 at DATA, 26 after the message data, 28 at AUTH, 29 at TLS …; the reply lines are
    ``<** 550 5.1.1 …`` (refused) and ``<-  250 …`` (accepted).
    """
    program = need("swaks")
    return subprocess.run(
        [program, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
