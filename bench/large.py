#!/usr/bin/env python3
"""One large message (default 50 MiB): time to the 250, and Gannet's memory growth meanwhile.

The message (headers and base64-like 76-column lines, SIZE bytes in all on
the wire, CRLF line ends, dot-stuffing not needed) is prepared before the
clock starts. smtplib opens the session (EHLO, MAIL FROM with SIZE=, RCPT,
DATA); then the prepared bytes and the final "." are written raw
(``SMTP.send``) and the reply read (``SMTP.getreply``). Reported:

- to 250 s: from the first body byte sent to the 250 read (what the issue's
  "accepted in under 1 s" measures; includes the server's fsync);
- MiB/s: SIZE / that time;
- delivered s: from the 250 until the file is in the Maildir's new/;
- Gannet RSS growth: the highest VmRSS seen (sampled every 5-10 ms by
  threads) minus VmRSS before the session: of the server process up to the
  250 (the accept path), and of the server and its delivery worker together
  up to the delivery into the Maildir; also the growth of the server's
  VmHWM (the kernel's own peak) over the whole span.
- `--queue-url postgres`: the same against Gannet on a private PostgreSQL
  (the body goes into the database, and back out into a file for delivery).
- Postfix, side by side: the same session against a private Postfix
  (message_size_limit raised to 100 MiB), with the summed RSS of its
  processes for reference.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _common
from _common import peers

LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"  # 78 bytes


def make_message(size: int) -> bytes:
    """Exactly ``size`` bytes of message, CRLF lines, no line starting with a dot."""
    head = (b"From: large@client.test\r\nTo: alice@example.test\r\nSubject: large message\r\n"
            b"Message-ID: <large-1@client.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    body_size = size - len(head)
    full, rest = divmod(body_size, len(LINE))
    tail = b"A" * max(rest - 2, 0) + b"\r\n" if rest >= 2 else b""
    message = head + LINE * full + tail
    return message + b"\r\n"[: size - len(message)] if len(message) < size else message


class Sampler:
    """Samples one number (e.g. a process's VmRSS) every ``interval`` seconds in a thread."""

    def __init__(self, sample: Callable[[], int], interval: float = 0.005) -> None:
        self.sample, self.interval = sample, interval
        self.samples: list[tuple[float, int]] = [(time.monotonic(), sample())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.sample()))
            time.sleep(self.interval)

    def peak(self, until: float = float("inf")) -> int:
        return max(v for t, v in self.samples if t <= until)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def settle(sample: Callable[[], int], timeout: float = 15.0) -> None:
    """Wait until ``sample()`` (KiB) stays within 1 MiB for half a second: the delivery
    worker is still importing and connecting when the server starts to listen, and a
    baseline taken then counted its start-up (~25-45 MiB) as the message's."""
    deadline = time.monotonic() + timeout
    last = sample()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sample()
        if abs(now - last) < 1024:
            return
        last = now


def send_large(host: str, port: int, message: bytes, maildir_new: Path) -> tuple[float, float, float]:
    """(seconds from the first body byte to the 250, seconds from the 250 to the file in new/,
    the monotonic time of the 250)."""
    before = set(os.listdir(maildir_new)) if maildir_new.exists() else set()
    with smtplib.SMTP(host, port, timeout=120) as client:
        client.ehlo("large.client.test")
        client.mail("large@client.test", [f"SIZE={len(message)}"] if client.has_extn("size") else [])
        code, reply = client.rcpt("alice@example.test")
        if code != 250:
            raise RuntimeError(f"RCPT: {code} {reply!r}")
        code, reply = client.docmd("DATA")
        if code != 354:
            raise RuntimeError(f"DATA: {code} {reply!r}")
        started = time.monotonic()
        client.send(message)
        client.send(b".\r\n")
        code, reply = client.getreply()
        accepted = time.monotonic()
        if code != 250:
            raise RuntimeError(f"end of DATA: {code} {reply!r}")

    def delivered() -> bool:
        return maildir_new.exists() and bool(set(os.listdir(maildir_new)) - before)
    peers.wait_for(delivered, 120, f"the large message in {maildir_new}", interval=0.01)
    time.sleep(0.1)  # let the sampler see the delivery's own peak, if any, end
    return accepted - started, time.monotonic() - accepted - 0.1, accepted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--size-mib", type=float, default=50, help="message size in MiB (default 50)")
    parser.add_argument("--no-postfix", action="store_true", help="Gannet only")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--queue-url", metavar="URL",
                        help="Gannet's queue: postgres (a private PostgreSQL) or a postgresql:// URL; "
                             "default SQLite (see _common.BenchQueue)")
    args = parser.parse_args(argv)
    queue = _common.BenchQueue(args.queue_url)
    if not args.no_postfix:
        _common.require("postfix")
    size = int(args.size_mib * 1024 * 1024)
    message = make_message(size)
    limit = f"{int(args.size_mib) + 16}M"
    rows = []
    work = _common.workdir("large")
    try:
        g = _common.start_gannet(work, smtp={"max_message_size": limit}, queue_url=queue.url("large"))
        try:
            new = g.maildir(_common.BENCH_USER) / "new"
            settle(lambda: peers.tree_rss_kib(g.pid))
            rss0, tree0 = peers.rss_kib(g.pid), peers.tree_rss_kib(g.pid)
            hwm0 = peers.status_kib(g.pid, "VmHWM")
            with Sampler(lambda: peers.rss_kib(g.pid)) as rss, \
                    Sampler(lambda: peers.tree_rss_kib(g.pid), interval=0.01) as tree:
                to_250, to_file, at_250 = send_large(*g.address(), message, new)
            hwm = peers.status_kib(g.pid, "VmHWM")
            rows.append([f"gannet ({queue.label})", size / 2**20, to_250, size / 2**20 / to_250, to_file,
                         tree0 / 1024, (rss.peak(at_250) - rss0) / 1024, (tree.peak() - tree0) / 1024,
                         (hwm - hwm0) / 1024])
        finally:
            g.stop()
        if not args.no_postfix:
            pf = _common.start_postfix(work)
            try:
                rss0 = peers.tree_rss_kib(pf.master_pid or 0)
                with Sampler(lambda: peers.tree_rss_kib(pf.master_pid or 0), interval=0.02) as rss:
                    to_250, to_file, at_250 = send_large(pf.host, pf.port, message,
                                                         pf.maildir(_common.BENCH_USER) / "new")
                rows.append(["postfix", size / 2**20, to_250, size / 2**20 / to_250, to_file,
                             rss0 / 1024, (rss.peak(at_250) - rss0) / 1024, (rss.peak() - rss0) / 1024, ""])
            finally:
                pf.close()
    finally:
        _common.remove(work, args.keep)

    print(f"\none message of {size:,} bytes; memory in MiB\n")
    print("RSS before and growth to Maildir: all the server's processes (Gannet's server and delivery\n"
          "worker; Postfix's master and daemons). Growth to 250 and VmHWM: the process that accepted\n"
          "the message (Gannet's server; for Postfix, again all processes).\n")
    print(_common.table(["server", "MiB", "to 250 s", "MiB/s", "250→Maildir s", "RSS before",
                         "RSS growth to 250", "RSS growth to Maildir", "VmHWM growth"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
