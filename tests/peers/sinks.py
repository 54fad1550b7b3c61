"""Servers that take what a sender gives and keep little: smtp-sink (``SmtpSink``) and ``BlackHole``.

``SmtpSink`` is Postfix's smtp-sink counting (and optionally dumping) messages;
``BlackHole`` accepts TCP connections and never answers, for greeting timeouts.
Both listen on loopback only and must never be left running: each is a context
manager whose ``stop()``/``close()`` ends its process or thread.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .base import SINK_HOST, PeerError, free_port, need, split_address, wait_for, wait_port
from .processes import _terminate, spawn_logged


class SmtpSink:
    """Postfix's smtp-sink on its own address: accepts everything, counts, optionally dumps.

    The count is read from smtp-sink's ``-c`` counters: it writes
    ``sess=N quit=N mesg=N`` to stdout (separated by CR) whenever a session ends
    or a message completes; ``count()`` returns the last ``mesg=``. With
    ``dump=True``, each message is also written to ``workdir/sink/HHMMSS.RANDOM``
    (smtp-sink's ``-d`` template; the time prefix keeps random names from
    colliding), with ``X-Rcpt-Args`` etc. headers in front; ``messages()`` lists
    them. smtp-sink runs as root (``-u root``): the suite is root, and the dump
    directory may be unreachable for any other user.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        listen: str | None = None,
        dump: bool = False,
        backlog: int = 1000,
        max_sessions: int = 1000,
        extra_args: Sequence[str] = (),
        start: bool = True,
    ) -> None:
        self.program = need("smtp-sink")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if listen is None:
            listen = f"{SINK_HOST}:{free_port(SINK_HOST)}"
        self.host, self.port = split_address(listen)
        self.dump_dir = self.workdir / "sink" if dump else None
        self.out_path = self.workdir / "smtp-sink.out"
        self.args = [self.program, "-u", "root", "-c", "-m", str(max_sessions)]
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self.args += ["-d", f"{self.dump_dir}/%H%M%S."]
        self.args += [*extra_args, f"{self.host}:{self.port}", str(backlog)]
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        self.proc = spawn_logged(self.args, self.out_path, truncate=True)
        wait_port(self.host, self.port, 10, proc=self.proc, what="smtp-sink")

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def count(self) -> int:
        """Messages completed so far (smtp-sink's own counter)."""
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            return 0
        found = re.findall(r"mesg=(\d+)", text)
        return int(found[-1]) if found else 0

    def wait_count(self, n: int, timeout: float = 60) -> int:
        wait_for(lambda: self.count() >= n, timeout, f"smtp-sink to count {n} messages (has {self.count()})")
        return self.count()

    def messages(self) -> list[Path]:
        if self.dump_dir is None:
            raise PeerError("SmtpSink(dump=False) keeps no messages")
        return sorted(p for p in self.dump_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 5)

    close = stop

    def __enter__(self) -> SmtpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BlackHole:
    """A TCP server that accepts connections and never says anything (no banner, no reply).

    For greeting timeouts: a client connects at once, then waits. Listens on a
    free port of ``host`` (default SINK_HOST's address, 127.0.0.3); a thread
    accepts and holds every connection until ``close()``; ``accepted`` counts
    them. A context manager.
    """

    def __init__(self, host: str = SINK_HOST, port: int = 0) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"black-hole-{self.port}", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.held)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.held:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
