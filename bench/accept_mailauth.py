"""`bench/accept.py --mailauth`: Gannet's accept rate with the inbound checks off and on, and the ratio.

Both runs are the same Gannet, the same smtp-source load and the same message;
only `[mailauth] checks` differs. The client (127.0.0.1) is outside
`trusted_networks` in both, so with checks on every message gets SPF (MAIL
FROM bench@client.test), DKIM (the message carries an rsa-sha256 signature by
client.test, made here with dkimpy), DMARC (p=reject, passes) and the
Authentication-Results header. DNS: a dnsmasq on 127.0.0.53 (tests/peers/
DnsServer) serves the records, TTL 300 s; Gannet's resolver caches them, so
after the first message every check is answered from cache, as the issue asks.

The message is smtp-source's `-F FILE` (4 KiB body by default), one
recipient; both runs fsync before 250 and deliver into a Maildir. Printed: the
rate (messages / smtp-source wall time) and the server's CPU per message for
each run, and on/off. The issue's target: the checks cost at most a third of
the rate (on/off ≥ 0.67).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import _common
import dkim
from _common import peers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SENDER = "bench@client.test"


def _key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def _message_file(path: Path, pem: bytes, size: int) -> None:
    """A DKIM-signed message for smtp-source -F (LF line endings: it sends each line with CRLF)."""
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, size // len(line))
    message = (
        f"From: Bench <{SENDER}>\r\nTo: {_common.BENCH_USER}\r\nSubject: mailauth bench\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <bench@client.test>\r\n\r\n"
    ).encode() + body
    signed = (
        dkim.sign(
            message,
            b"s1",
            b"client.test",
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        + message
    )
    path.write_bytes(signed.replace(b"\r\n", b"\n"))


def sender_world(message: Path, size: int) -> peers.DnsRecords:
    """Write the signed message (`size` body bytes) to `message`; return the DNS records that
    make it pass: SPF for 127.0.0.0/8, the DKIM key, DMARC p=reject (also bench/checks.py's)."""
    pem, record = _key()
    _message_file(message, pem, size)
    return {
        "client.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "A": ["127.0.0.1"]},
        "_dmarc.client.test": {"TXT": ["v=DMARC1; p=reject"]},
        "s1._domainkey.client.test": {"TXT": [record]},
    }


def _gannet(work: Path, dns: peers.DnsServer, checks: bool) -> peers.GannetProcess:
    return _common.start_gannet(
        work,
        relay={"trusted_networks": ["127.0.0.99/32"]},  # 127.0.0.1, smtp-source, is checked
        sections={
            "dns": {"nameservers": [dns.nameserver]},
            "mailauth": {"checks": checks, "dmarc": "enforce"},
        },
    )


def _smtp_source(target: str, message: Path, sessions: int, messages: int, *, keep_connection: bool) -> float:
    """smtp-source sending `message` (-F, which refuses -l: not peers.smtp_source); wall seconds."""
    argv = [
        peers.need("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-f",
        SENDER,
        "-t",
        _common.BENCH_USER,
        "-M",
        "client.test",
        "-F",
        str(message),
    ]
    argv += ["-d"] if keep_connection else []
    started = time.monotonic()
    done = subprocess.run([*argv, target], capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise peers.PeerError(f"smtp-source exited {done.returncode}: {done.stdout}{done.stderr}")
    return time.monotonic() - started


class Figure(NamedTuple):
    """One run: its rate, Gannet's CPU per message (in all and by process), a delivered header."""

    rate: float
    cpu: float
    results: str  # the Authentication-Results of one delivered message
    by_process: dict[str, float]


def run_once(
    dns: peers.DnsServer,
    message: Path,
    checks: bool,
    sessions: int,
    style: str,
    messages: int,
    keep: bool,
    profile: Path | None,
) -> Figure:
    work = _common.workdir(f"mailauth-{'on' if checks else 'off'}-{sessions}-{style}")
    try:
        g = _gannet(work, dns, checks)
        profiler = None
        try:
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
                name = f"mailauth-{'on' if checks else 'off'}-{sessions}-{style}.txt"
                profiler = _common.Profiler(g.pid, profile / name)
            cpu0 = peers.process_tree_cpu_seconds(g.pid)
            split = _common.cpu_by_process(g.pid)
            elapsed = _smtp_source(g.target(), message, sessions, messages, keep_connection=(style == "many"))
            cpu = peers.process_tree_cpu_seconds(g.pid) - cpu0
            # The checks child starts at the first message: its start-up (imports, the Public
            # Suffix List) counts here, a few hundredths of a ms a message over 10,000.
            split = _common.cpu_by_process(g.pid) - split
            maildir = g.maildir(_common.BENCH_USER)
            peers.wait_progress(
                lambda: len(list((maildir / "new").iterdir())) if (maildir / "new").exists() else 0,
                messages,
                stall=120,
                what="delivery",
            )
            sample = next((maildir / "new").iterdir()).read_text(errors="replace")
            header = sample.split("\n\n", 1)[0]
            results = " ".join(
                line.strip()
                for line in header.splitlines()
                if line.startswith(("Authentication-Results", "\t")) and "=" in line
            )
        finally:
            if profiler:
                profiler.stop()
                print(profiler.summary(), file=sys.stderr)
            g.stop()
    finally:
        _common.remove(work, keep)
    by_process = {name: 1000 * seconds / messages for name, seconds in split.items()}
    return Figure(messages / elapsed, 1000 * cpu / messages, results, by_process)


def main(
    sessions: list[int],
    styles: list[str],
    messages: int,
    size: int,
    keep: bool,
    profile: Path | None,
    *,
    repeat: int = 1,
) -> int:
    _common.require("smtp-source", "dnsmasq")
    peers.raise_nofile(4096)
    work = _common.workdir("mailauth-dns")
    message = work / "message.eml"
    records = sender_world(message, size)
    rows = []
    splits: list[tuple[int, str, dict[str, float], dict[str, float]]] = []
    with peers.DnsServer(work / "dns", records=records, ttl=300) as dns:
        for n in sessions:
            for style in styles:
                figures: dict[bool, list[Figure]] = {False: [], True: []}
                for _ in range(max(1, repeat)):  # off, on, off, on …: both see the same host weather
                    for checks in (False, True):
                        label = "on" if checks else "off"
                        print(
                            f"… checks {label}: {messages} messages, {n} sessions, {style} per connection",
                            file=sys.stderr,
                            flush=True,
                        )
                        figure = run_once(dns, message, checks, n, style, messages, keep, profile)
                        figures[checks].append(figure)
                        print(
                            f"  {figure.rate:,.0f} msgs/s, {figure.cpu:.2f} ms CPU/msg",
                            file=sys.stderr,
                            flush=True,
                        )
                        time.sleep(1)
                off = _common.median_by(figures[False], lambda f: f.rate)
                on = _common.median_by(figures[True], lambda f: f.rate)
                ratio = _common.pair_ratios([f.rate for f in figures[True]], [f.rate for f in figures[False]])
                connections = "1 per conn" if style == "one" else "all on 1 conn"
                rows.append([n, connections, off.rate, on.rate, ratio, off.cpu, on.cpu])
                print(f"  checks on, a delivered header: {on.results}", file=sys.stderr)
                splits.append((n, style, off.by_process, on.by_process))
    _common.remove(work, keep)
    print(
        f"\n{messages} messages, {size}-byte bodies (DKIM-signed), 1 recipient; "
        "DNS from Gannet's cache (dnsmasq behind it); target: on/off >= 0.67"
        + (f"; median of {repeat} runs each, on/off: median (every pair)" if repeat > 1 else "")
        + "\n"
    )
    print(
        _common.table(
            [
                "sessions",
                "connections",
                "msgs/s checks off",
                "msgs/s checks on",
                "on/off",
                "CPU ms/msg off",
                "CPU ms/msg on",
            ],
            rows,
        )
    )
    print("\nCPU ms/msg while smtp-source ran, by process (the median runs), checks off → on:")
    for n, style, off_split, on_split in splits:
        names = sorted(set(off_split) | set(on_split), key=lambda k: -on_split.get(k, 0.0))
        parts = ", ".join(f"{k} {off_split.get(k, 0.0):.2f} → {on_split.get(k, 0.0):.2f}" for k in names)
        print(f"  {n} {style}: {parts}")
    return 0
