"""Gannet itself as a peer: ``GannetProcess`` runs ``python -m gannet serve``, ``gannet_cli`` the rest.

Gannet always runs as a subprocess from this checkout (``REPO`` first on
PYTHONPATH), never imported into the test process, so a test sees what a
postmaster would: exit statuses, the log, the sockets. Whoever starts it stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import REPO, PeerError, split_address, wait_port
from .files import maildir_files
from .processes import raise_nofile


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    mode: str

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def _gannet_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("GANNET_CONFIG", None)
    if extra:
        env.update(extra)
    return env


def gannet_cli(
    workdir: Path,
    *args: str,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gannet ARGS`` against ``workdir/gannet.toml`` (or a given .toml path).

    The config is named by ``$GANNET_CONFIG`` (CONTRACT.md's second choice) and
    the command runs in its directory (the third choice, ``./gannet.toml``), so
    no sub-command depends on where a ``--config`` flag may go.
    """
    config = Path(workdir)
    if config.is_dir():
        config = config / "gannet.toml"
    full_env = _gannet_env(env)
    full_env["GANNET_CONFIG"] = str(config)
    result = subprocess.run(
        [sys.executable, "-m", "gannet", *args],
        input=input,
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise PeerError(
            f"gannet {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


class GannetProcess:
    """``gannet serve`` in a subprocess, with its config in ``workdir/gannet.toml``.

    Started on construction (``start=False`` to defer); ready when every
    ``[[listen]]`` address accepts TCP. stderr (and stdout) go to
    ``workdir/gannet.log``, appended across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        config_toml: str,
        *,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        startup_timeout: float = 30.0,
        nofile: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "gannet.toml"
        self.config_path.write_text(config_toml)
        self.config: dict[str, Any] = tomllib.loads(config_toml)
        self.listeners = [
            Listener(*split_address(e["address"]), e.get("mode", "mx")) for e in self.config.get("listen", [])
        ]
        self.log_path = self.workdir / "gannet.log"
        self.env = env
        self.startup_timeout = startup_timeout
        self.nofile = nofile
        self.serve_args: list[str] = []  # more `gannet serve` options, e.g. ["--log-format", "json"]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        if start:
            self.start()

    # -- lifecycle
    def start(self) -> None:
        if self.running:
            raise PeerError("gannet is already running")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        nofile = self.nofile
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gannet",
                    "serve",
                    "--config",
                    str(self.config_path),
                    *self.serve_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=_gannet_env(self.env),
                start_new_session=True,
                preexec_fn=(lambda: raise_nofile(nofile)) if nofile else None,
            )
        try:
            for lst in self.listeners:
                wait_port(
                    lst.host,
                    lst.port,
                    self.startup_timeout,
                    proc=self.proc,
                    what=f"gannet serve ({self.config_path})",
                )
        except PeerError as exc:
            self.kill()
            raise PeerError(f"{exc}\n--- gannet.log ---\n{self.log_text()[-4000:]}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PeerError("gannet was never started")
        return self.proc.pid

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit status (0 expected). PeerError if it would not stop.

        The default wait is longer than the 30 s Gannet gives open sessions to finish.
        """
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PeerError(f"gannet did not exit within {timeout:.0f}s of SIGTERM; killed it") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        if self.running:
            self.stop()
        self.start()

    def __enter__(self) -> GannetProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:
            self.kill()

    # -- what it has done
    def log_text(self, *, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def address(self, mode: str = "mx") -> tuple[str, int]:
        """(host, port) of the first listener in ``mode``."""
        for lst in self.listeners:
            if lst.mode == mode:
                return lst.address
        raise PeerError(f"no [[listen]] with mode = {mode!r} in {self.config_path}")

    def target(self, mode: str = "mx") -> str:
        """``host:port`` for smtp-source and swaks."""
        host, port = self.address(mode)
        return f"{host}:{port}"

    def _resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.workdir / p

    @property
    def data_dir(self) -> Path:
        return self._resolve(self.config.get("data_dir", "var"))

    @property
    def maildir_template(self) -> str:
        template = self.config.get("mailboxes", {}).get("maildir")
        return str(self._resolve(template)) if template else str(self.data_dir / "mail/{domain}/{user}")

    @property
    def maildir_root(self) -> Path:
        """The directory above ``{domain}`` in the Maildir template (what Dovecot is pointed at)."""
        template = self.maildir_template
        if not template.endswith("/{domain}/{user}"):
            raise PeerError(f"maildir template {template!r} is not ROOT/{{domain}}/{{user}}")
        return Path(template[: -len("/{domain}/{user}")])

    def maildir(self, address: str) -> Path:
        user, _, domain = address.rpartition("@")
        return Path(self.maildir_template.format(domain=domain.lower(), user=user))

    def delivered(self, address: str | None = None) -> list[Path]:
        """Message files in one mailbox, or in every mailbox."""
        return maildir_files(self.maildir(address) if address else self.maildir_root)

    def cli(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return gannet_cli(self.workdir, *args, input=input, check=check, timeout=timeout, env=self.env)
