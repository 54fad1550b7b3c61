"""A private PostgreSQL (``PostgresServer``) from its binaries, on 127.0.0.32 and a unix socket.

For the PostgreSQL queue's tests. It must never use a system cluster or run the
server as root (PostgreSQL refuses; as root it runs as ``nobody``), and it keeps
PostgreSQL's durable defaults unless a test passes settings.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import PeerError, free_port, need, wait_for, wait_port
from .private_root import _PrivateRoot
from .processes import spawn_logged

POSTGRES_HOST = "127.0.0.32"  # PostgresServer's loopback address
POSTGRES_USER = "gannet"  # the superuser initdb creates; trusted on the socket and on loopback


def postgres_bin(program: str) -> str:
    """A PostgreSQL server program (initdb, postgres, pg_ctl): Debian keeps them in
    /usr/lib/postgresql/VERSION/bin, off PATH; the newest version wins."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for directory in reversed(versions):
        if (directory / program).exists():
            return str(directory / program)
    return need(program)


class PostgresServer:
    """A private PostgreSQL: ``initdb`` into ``workdir/postgres/data``, the
    postmaster on ``POSTGRES_HOST:port`` (a free port) and on a unix socket in
    ``workdir/postgres``, trust authentication for ``POSTGRES_USER``.

    PostgreSQL refuses to run as root, so as root (the CI machine) the server runs
    as ``nobody``: its directory is a fresh ``/tmp/gannet-postgres-XXXX``
    (``_PrivateRoot``, always in /tmp so that the socket path stays short) handed
    to that user. As any other user it simply runs as that user. ``settings``
    are passed as ``-c name=value`` (e.g. ``{"fsync": "off"}`` for unit tests that
    do not test durability; the default keeps PostgreSQL's durable defaults).
    ``create_database(name)`` makes an empty database (from template0) for one test.
    """

    def __init__(
        self, workdir: Path, *, settings: Mapping[str, str] | None = None, start: bool = True
    ) -> None:
        self.initdb, self.postgres = postgres_bin("initdb"), postgres_bin("postgres")
        self.root = _PrivateRoot(Path(workdir), "postgres", force_tmp=True)
        self.data = self.root.path / "data"
        self.log_path = self.root.path / "postgres.log"
        self.host, self.port = POSTGRES_HOST, free_port(POSTGRES_HOST)
        self.settings = {"max_connections": "200", "shared_buffers": "128MB", **(settings or {})}
        self.as_user = "nobody" if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def _run_as(self) -> dict[str, Any]:
        if self.as_user is None:
            return {}
        pw = pwd.getpwnam(self.as_user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> None:
        if not self.data.exists():
            if self.as_user is not None:
                pw = pwd.getpwnam(self.as_user)
                os.chown(self.root.path, pw.pw_uid, pw.pw_gid)
            self.root.path.chmod(0o700 if self.as_user is None else 0o755)
            done = subprocess.run(
                [
                    self.initdb,
                    "-D",
                    str(self.data),
                    "-U",
                    POSTGRES_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                cwd="/",
                env=self._env(),
                **self._run_as(),
            )
            if done.returncode != 0:
                raise PeerError(f"initdb failed ({done.returncode}): {done.stderr or done.stdout}")
        args = [
            self.postgres,
            "-D",
            str(self.data),
            "-k",
            str(self.root.path),
            "-h",
            self.host,
            "-p",
            str(self.port),
        ]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        self.proc = spawn_logged(args, self.log_path, cwd="/", env=self._env(), **self._run_as())
        wait_port(self.host, self.port, 30, proc=self.proc, what="postgres")
        wait_for(self._ready, 30, f"postgres to accept connections (log: {self.log_path})")

    def _ready(self) -> bool:
        """Accepting connections: a listening socket is not enough while it starts up."""
        import psycopg

        if self.proc is not None and self.proc.poll() is not None:
            raise PeerError(f"postgres exited with status {self.proc.returncode}: {self.log_text()[-2000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=5).close()
        except psycopg.OperationalError:
            return False
        return True

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "HOME": str(self.root.path)}

    @property
    def socket_dir(self) -> Path:
        return self.root.path

    def url(self, database: str = "postgres", *, tcp: bool = False, schema: str | None = None) -> str:
        """``postgresql://`` URL of ``database``: over the unix socket, or TCP with ``tcp=True``;
        with ``schema``, every connection works in that schema (``search_path``)."""
        if tcp:
            url = f"postgresql://{POSTGRES_USER}@{self.host}:{self.port}/{database}"
        else:
            url = f"postgresql://{POSTGRES_USER}@/{database}?host={self.socket_dir}&port={self.port}"
        if schema is not None:
            url += ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"
        return url

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; the rows it returns (if any)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement)  # type: ignore[arg-type]  # test-supplied SQL
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL (over the unix socket). Takes 0.1 to 0.3 s."""
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def create_schema(self, name: str, database: str = "postgres") -> str:
        """A new, empty schema in ``database``; returns a URL whose connections use only
        it. Takes milliseconds: what tests that each need a fresh queue use."""
        self.sql(f'CREATE SCHEMA "{name}"', database)
        return self.url(database, schema=name)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.root.remove(keep=("postgres.log",))

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
