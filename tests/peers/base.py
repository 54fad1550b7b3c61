"""The ground every peer stands on: addresses, errors, finding programs, waiting.

Holds the loopback addresses and test accounts shared by all peers, ``PeerError``,
``need(program)`` (skip outside CI, fail in CI), free ports and the polling waits.
It must never start a peer or import a peer module (they all import this one), and
no wait here may sleep blindly or wait without a deadline.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# One loopback address per fake host (DESIGN.md "Real components in tests").
GANNET_HOST = "127.0.0.1"
POSTFIX_HOST = "127.0.0.2"
SINK_HOST = "127.0.0.3"
DOVECOT_HOST = "127.0.0.4"

# The accounts the ``gannet`` fixture creates (tests/conftest.py), with their passwords.
USERS = {"alice@example.test": "alice-password", "bob@example.test": "bob-password"}

SEARCH_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin", "/usr/lib/dovecot", "/usr/local/sbin")

# Which Debian package provides a program, for skip and failure messages.
PACKAGES = {
    "postfix": "postfix",
    "postconf": "postfix",
    "smtp-source": "postfix",
    "smtp-sink": "postfix",
    "postqueue": "postfix",
    "swaks": "swaks",
    "dovecot": "dovecot-imapd",
    "doveadm": "dovecot-core",
    "dnsmasq": "dnsmasq",
    "opendkim-testkey": "opendkim-tools",
    "haproxy": "haproxy",
    "opendkim": "opendkim",
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "postgres": "postgresql",
    "chromium": "chromium",
    "bsd-mailx": "bsd-mailx",
    "systemd-analyze": "systemd",
}


class PeerError(RuntimeError):
    """A peer did not start, did not stop, or misbehaved; the message says which and why."""


# --------------------------------------------------------------------------- programs


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def find_program(program: str) -> str | None:
    """Absolute path of ``program`` from PATH or the sbin/libexec directories, or None."""
    found = shutil.which(program)
    if found is None:
        found = shutil.which(program, path=os.pathsep.join(SEARCH_DIRS))
    return str(Path(found).resolve()) if found else None


def need(program: str) -> str:
    """Absolute path of ``program``; skip the test (fail it in CI) when it is missing."""
    found = find_program(program)
    if found:
        return found
    package = f"package {PACKAGES[program]!r}" if program in PACKAGES else "package that provides it"
    reason = (
        f"{program} is not installed (searched PATH and {', '.join(SEARCH_DIRS)}); "
        f"install the Debian {package}, as .ci/run does"
    )
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- sockets


# The ports free_port handed out lately: the kernel may offer a port again as
# soon as its probe socket is closed, and one config asks for several at once
# (a suite run once got the same port for two listeners).
_RECENT_PORTS: collections.deque[tuple[str, int]] = collections.deque(maxlen=256)


def free_port(host: str = GANNET_HOST) -> int:
    """A TCP port that is free on ``host`` right now (bind to port 0, read it,
    close), and not one handed out lately."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _RECENT_PORTS:
            _RECENT_PORTS.append((host, port))
            return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    host: str, port: int, timeout: float = 15.0, *, proc: subprocess.Popen[Any] | None = None, what: str = ""
) -> None:
    """Poll until ``host:port`` accepts a TCP connection; PeerError after ``timeout``.

    With ``proc``, give up at once if that process has exited.
    """
    deadline = time.monotonic() + timeout
    name = what or f"{host}:{port}"
    while True:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"{name} exited with status {proc.returncode} before {host}:{port} accepted")
        if time.monotonic() >= deadline:
            raise PeerError(f"{name}: nothing accepted on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.02)


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition()`` until it returns something truthy; PeerError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise PeerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_progress(
    count: Callable[[], int], target: int, *, stall: float, what: str, interval: float = 0.25
) -> int:
    """Poll ``count()`` until it reaches ``target``; PeerError if it stops growing for ``stall`` seconds.

    For long waits whose length depends on speed (thousands of deliveries):
    bounded by lack of progress rather than by a total guess.
    """
    last, last_change = count(), time.monotonic()
    while last < target:
        time.sleep(interval)
        now_count = count()
        if now_count != last:
            last, last_change = now_count, time.monotonic()
        elif time.monotonic() - last_change > stall:
            raise PeerError(f"{what}: stuck at {last} of {target} for {stall:.0f}s")
    return last


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` → (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", address)
    if not m:
        raise ValueError(f"{address!r} is not host:port")
    return (m.group(1) or m.group(3)), int(m.group(2) or m.group(4))
