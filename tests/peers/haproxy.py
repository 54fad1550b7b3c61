"""HAProxy (``HAProxy``) in TCP mode on 127.0.0.8 in front of Gannet nodes.

With ``send-proxy`` / ``send-proxy-v2`` and health checks. It must never listen
outside loopback nor outlive its test: ``stop()`` ends it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .base import PeerError, free_port, need, split_address, wait_port
from .processes import _terminate, spawn_logged

HAPROXY_HOST = "127.0.0.8"  # HAProxy's frontend address

HAPROXY_CFG = """\
# written by tests/peers/haproxy.py HAProxy
global
    pidfile {pidfile}
    maxconn 4000
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 5m
    timeout server 5m
    timeout check 2s
frontend smtp
    bind {host}:{port}
    default_backend gannet
backend gannet
    balance {balance}
{servers}"""


class HAProxy:
    """HAProxy in TCP mode on ``HAPROXY_HOST``, balancing over ``servers`` (``host:port``).

    ``send_proxy``: ``"v2"`` (``send-proxy-v2``), ``"v1"`` (``send-proxy``) or
    ``None`` (no header). ``check=True`` adds a health check every 500 ms
    (``option smtpchk``: the greeting and a HELO must get 2xx; two failures mark a
    server down, one success up again), so a killed node leaves the rotation;
    its connections in flight are retried on another (``option redispatch``).
    Runs in the foreground (``-db``) with its config, pid file and log
    (``haproxy.log``: one line per connection, ``option tcplog``) in
    ``workdir``; ``stop()`` sends SIGTERM and waits.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        servers: Sequence[str],
        send_proxy: str | None = "v2",
        balance: str = "roundrobin",
        check: bool = False,
        listen: str | None = None,
        start: bool = True,
    ) -> None:
        self.program = need("haproxy")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = split_address(listen or f"{HAPROXY_HOST}:{free_port(HAPROXY_HOST)}")
        flags = {"v2": " send-proxy-v2", "v1": " send-proxy", None: ""}[send_proxy]
        checks = " check inter 500ms fall 2 rise 1" if check else ""
        lines = [f"    server node{i + 1} {s}{flags}{checks}" for i, s in enumerate(servers)]
        if check:
            lines.insert(0, "    option smtpchk HELO haproxy.test")
        self.config_path = self.workdir / "haproxy.cfg"
        self.pid_path = self.workdir / "haproxy.pid"
        self.log_path = self.workdir / "haproxy.log"
        self.config_path.write_text(
            HAPROXY_CFG.format(
                pidfile=self.pid_path,
                host=self.host,
                port=self.port,
                balance=balance,
                servers="\n".join(lines) + "\n",
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        check = subprocess.run(
            [self.program, "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise PeerError(f"haproxy -c refused {self.config_path}:\n{check.stdout}{check.stderr}")
        self.proc = spawn_logged([self.program, "-db", "-f", str(self.config_path)], self.log_path)
        try:
            wait_port(self.host, self.port, 15, proc=self.proc, what="haproxy")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- haproxy.log ---\n{self.log_text()[-3000:]}") from None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 10)
            self.proc = None

    close = stop

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
