"""Real peers: the one module that starts the programs Gannet is tested against.

Used by tests/integration, tests/interop (through the fixtures in
tests/conftest.py) and by bench/ (imported directly). It starts:

- Gannet itself: ``GannetProcess`` runs ``python -m gannet serve --config F``
  as a subprocess, and ``gannet_cli`` runs its other sub-commands;
- a private Postfix (``PostfixInstance``) with its own config, queue and data
  directories, delivering into Maildirs with virtual(8), relaying everything
  to one host, or accepting and holding or discarding;
- Postfix's load tools: ``smtp_source`` (the client) and ``SmtpSink`` (a
  counting, optionally dumping, server);
- a private Dovecot (``DovecotImap``) reading a Maildir tree over IMAP, and
  later taking LMTP (over TCP or its unix socket), optionally checking SASL
  AUTH for Postfix (``auth_socket=True``, ``postfix_sasl_settings``);
- a TCP server that never greets (``BlackHole``), for greeting timeouts;
- swaks (``swaks``);
- dnsmasq (``DnsServer``) serving MX/A/AAAA/TXT/PTR records given as
  Python data, with NXDOMAIN and SERVFAIL on demand;
- HAProxy (``HAProxy``) in TCP mode on 127.0.0.8 in front of Gannet nodes,
  with ``send-proxy`` / ``send-proxy-v2`` and health checks.

Rules this module keeps:

- Loopback only, one address per fake host: Gannet 127.0.0.1, Postfix
  127.0.0.2, smtp-sink 127.0.0.3, Dovecot 127.0.0.4, dnsmasq 127.0.0.53 (127.0.0.0/8 is all
  loopback on Linux). Ports come from ``free_port`` on that address; none is
  fixed.
- Every wait polls a condition with a deadline; nothing sleeps blindly and
  nothing waits forever.
- Whoever starts a process stops it: every class is a context manager with an
  idempotent ``stop()``/``close()``, and the fixtures finalize them.
- A missing program is a skip with the reason (which Debian package to
  install), except when ``CI=true``, where it is a failure: the CI machine must
  run every interop test (``.ci/run`` installs the packages).

Privileges. The suite runs as root on the CI machine (Postfix and Dovecot
need root to start their masters). Both drop to their own users for most
work, and those users cannot traverse pytest's ``/tmp/pytest-of-root`` (mode
0700). So each private Postfix and Dovecot lives in a directory that its
users can reach: ``workdir/NAME`` when every ancestor of workdir is
world-searchable, else a fresh ``/tmp/gannet-NAME-XXXX`` (mode 0755) with a
symlink ``workdir/NAME`` pointing at it; the fresh directory is removed on
``close()`` after its log is copied to ``workdir`` (``postfix.log``,
``dovecot.log``). Dovecot never reads mail as root, so its mail processes run
as ``nobody`` and the Maildirs it serves are handed to that user (see
``DovecotImap``).

Durability, for comparisons with Gannet's "250 only after fsync": Postfix is
left at its defaults, which fsync the queue file before smtpd answers 250
(cleanup(8)) and fsync each Maildir file before virtual(8) reports success;
nothing here turns that off.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

REPO = Path(__file__).resolve().parents[1]

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
    "postfix": "postfix", "postconf": "postfix", "smtp-source": "postfix", "smtp-sink": "postfix",
    "postqueue": "postfix", "swaks": "swaks", "dovecot": "dovecot-imapd", "doveadm": "dovecot-core",
    "dnsmasq": "dnsmasq", "opendkim-testkey": "opendkim-tools", "haproxy": "haproxy", "opendkim": "opendkim",
    "initdb": "postgresql", "pg_ctl": "postgresql", "postgres": "postgresql", "chromium": "chromium",
    "bsd-mailx": "bsd-mailx", "systemd-analyze": "systemd",
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
    reason = (f"{program} is not installed (searched PATH and {', '.join(SEARCH_DIRS)}); "
              f"install the Debian {package}, as .ci/run does")
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- sockets


def free_port(host: str = GANNET_HOST) -> int:
    """A TCP port that is free on ``host`` right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 15.0, *,
              proc: subprocess.Popen[Any] | None = None, what: str = "") -> None:
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


def wait_progress(count: Any, target: int, *, stall: float, what: str, interval: float = 0.25) -> int:
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


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rindex(")") + 2:].split()


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int, *, children: bool = True) -> float:
    """utime+stime of ``pid`` (all its threads), plus cutime+cstime of its reaped children."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def child_pids(pid: int) -> list[int]:
    """Live direct children of ``pid`` (by scanning /proc)."""
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def descendant_pids(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    result, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            result.append(kid)
            todo.append(kid)
    return result


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a whole process tree: the root, the children it reaped, the live descendants.

    A child's time moves into its parent's cutime/cstime when the parent reaps
    it, so "root incl. reaped children + every live descendant" counts each
    tick once. (A process that exits between the two reads can be missed or
    counted twice; against totals of seconds this is noise.)
    """
    return process_cpu_seconds(pid) + sum(
        process_cpu_seconds(kid, children=False) for kid in descendant_pids(pid))


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, VmSize …); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def tree_rss_kib(pid: int) -> int:
    """Sum of VmRSS over a process and its live descendants (shared pages counted in each)."""
    return rss_kib(pid) + sum(rss_kib(k) for k in descendant_pids(pid))


def raise_nofile(limit: int) -> None:
    """Raise RLIMIT_NOFILE of this process to ``limit`` (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    if hard < limit:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            limit = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def _terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


_alive = alive  # the earlier, private spelling (tests/integration/test_process.py uses it)


# --------------------------------------------------------------------------- Maildir


def maildir_files(root: Path) -> list[Path]:
    """Every message file under ``root`` (any depth), in ``new/`` or ``cur/`` of a Maildir."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*")
                  if p.parent.name in ("new", "cur") and p.is_file() and not p.name.startswith("."))


def read_headers(path: Path) -> email.message.Message:
    """The header section of a stored message (the body is not read)."""
    with open(path, "rb") as f:
        head = bytearray()
        for line in f:
            if line in (b"\n", b"\r\n"):
                break
            head += line
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(bytes(head))


def message_ids(paths: Iterable[Path]) -> list[str]:
    """The Message-ID of each file (``""`` where there is none), in order."""
    return [str(read_headers(p).get("Message-ID", "")).strip() for p in paths]


# --------------------------------------------------------------------------- TOML


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        s = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts: scalars, lists, [tables], [[arrays of tables]].

    Sub-tables of a table are written as inline tables (enough for aliases).
    """
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, Mapping) and not _is_table_array(v)]
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"] + [f"{toml_value(str(kk))} = {toml_value(vv)}" if not _bare(kk)
                                        else f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _bare(key: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+", key) is not None


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, Mapping) for i in v)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; tables merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsCerts:
    """A test CA and one server certificate (mx.example.test, localhost, 127.0.0.1), as files."""

    ca: Any  # trustme.CA
    ca_file: Path
    cert_file: Path  # the server certificate followed by its chain
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA (hostname checks on)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls_certs(directory: Path, names: Sequence[str] = ("mx.example.test", "localhost", "127.0.0.1"),
                   ) -> TlsCerts:
    import trustme

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*names)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    key_file.chmod(0o600)
    return TlsCerts(ca, ca_file, cert_file, key_file)


# --------------------------------------------------------------------------- Gannet


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


def gannet_cli(workdir: Path, *args: str, input: str | None = None, check: bool = True,
               timeout: float = 60, env: Mapping[str, str] | None = None,
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
        [sys.executable, "-m", "gannet", *args], input=input, capture_output=True, text=True,
        cwd=config.parent, env=full_env, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise PeerError(f"gannet {' '.join(args)} exited {result.returncode}:\n"
                        f"{result.stdout}{result.stderr}")
    return result


class GannetProcess:
    """``gannet serve`` in a subprocess, with its config in ``workdir/gannet.toml``.

    Started on construction (``start=False`` to defer); ready when every
    ``[[listen]]`` address accepts TCP. stderr (and stdout) go to
    ``workdir/gannet.log``, appended across restarts.
    """

    def __init__(self, workdir: Path, config_toml: str, *, env: Mapping[str, str] | None = None,
                 start: bool = True, startup_timeout: float = 30.0, nofile: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "gannet.toml"
        self.config_path.write_text(config_toml)
        self.config: dict[str, Any] = tomllib.loads(config_toml)
        self.listeners = [Listener(*split_address(e["address"]), e.get("mode", "mx"))
                          for e in self.config.get("listen", [])]
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
                [sys.executable, "-m", "gannet", "serve", "--config", str(self.config_path),
                 *self.serve_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=_gannet_env(self.env), start_new_session=True,
                preexec_fn=(lambda: raise_nofile(nofile)) if nofile else None)
        try:
            for lst in self.listeners:
                wait_port(lst.host, lst.port, self.startup_timeout, proc=self.proc,
                          what=f"gannet serve ({self.config_path})")
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

    def cli(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return gannet_cli(self.workdir, *args, input=input, check=check, timeout=timeout, env=self.env)


# --------------------------------------------------------------------------- private dirs


def _world_searchable(path: Path) -> bool:
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


class _PrivateRoot:
    """A directory for a daemon whose unprivileged users must reach it (see the module docstring)."""

    def __init__(self, workdir: Path, name: str, *, force_tmp: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.temporary = force_tmp or not _world_searchable(self.workdir)
        if self.temporary:
            self.path = Path(tempfile.mkdtemp(prefix=f"gannet-{name}-", dir="/tmp"))
            self.path.chmod(0o755)
            link = self.workdir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.path)
        else:
            self.path = self.workdir / name
            self.path.mkdir(exist_ok=True)

    def remove(self, keep: Sequence[str] = ()) -> None:
        """Copy the ``keep`` files into ``workdir`` and delete a temporary root."""
        if not self.temporary or not self.path.exists():
            return
        for item in keep:
            src = self.path / item
            if src.exists():
                shutil.copyfile(src, self.workdir / item)
        shutil.rmtree(self.path, ignore_errors=True)
        link = self.workdir / self.name
        if link.is_symlink():
            link.unlink()


# --------------------------------------------------------------------------- Postfix


POSTFIX_MASTER_CF = """\
# service    type  private unpriv chroot wakeup maxproc command
{listen}      inet  n       -      n      -      -       smtpd
pickup       unix  n       -      n      60     1       pickup
cleanup      unix  n       -      n      -      0       cleanup
qmgr         unix  n       -      n      300    1       qmgr
tlsmgr       unix  -       -      n      1000?  1       tlsmgr
rewrite      unix  -       -      n      -      -       trivial-rewrite
bounce       unix  -       -      n      -      0       bounce
defer        unix  -       -      n      -      0       bounce
trace        unix  -       -      n      -      0       bounce
verify       unix  -       -      n      -      1       verify
flush        unix  n       -      n      1000?  0       flush
proxymap     unix  -       -      n      -      -       proxymap
proxywrite   unix  -       -      n      -      1       proxymap
smtp         unix  -       -      n      -      -       smtp
relay        unix  -       -      n      -      -       smtp
showq        unix  n       -      n      -      -       showq
error        unix  -       -      n      -      -       error
retry        unix  -       -      n      -      -       error
discard      unix  -       -      n      -      -       discard
local        unix  -       n      n      -      -       local
virtual      unix  -       n      n      -      -       virtual
lmtp         unix  -       -      n      -      -       lmtp
anvil        unix  -       -      n      -      1       anvil
scache       unix  -       -      n      -      1       scache
postlog      unix-dgram n  -      n      -      1       postlogd
"""

PostfixMode = Literal["maildir", "relay", "hold", "discard"]
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixInstance:
    """A private Postfix: own config_directory, queue_directory and data_directory.

    ``mode``:
      - ``"maildir"``: mail for ``domains`` is delivered by virtual(8) into
        ``maildir_root/DOMAIN/USER/`` (Gannet's layout) for each address in
        ``mailboxes``; the mailboxes are owned by ``nobody`` (virtual(8) refuses
        uid 0), everything else bounces;
      - ``"relay"``: everything is sent with smtp(8) to ``relayhost``
        (``"127.0.0.1:2525"``), from the instance's own address;
      - ``"hold"``: accepted and put on hold (``postqueue -p`` shows it);
      - ``"discard"``: accepted and thrown away.
    ``settings`` adds or overrides main.cf parameters. smtpd listens only on
    ``listen``; ``inet_interfaces = loopback-only`` (Postfix insists that its
    interfaces be configured addresses, and 127.0.0.2 is not one).
    Logs go to ``postfix.log`` through postlogd (``maillog_file``), not syslog.
    """

    def __init__(self, workdir: Path, *, listen: str | None = None, mode: PostfixMode = "maildir",
                 hostname: str = "postfix.test", mydomain: str = "postfix.test",
                 domains: Sequence[str] = ("example.test",),
                 mailboxes: Sequence[str] = ("alice@example.test", "bob@example.test"),
                 maildir_root: Path | None = None, relayhost: str | None = None,
                 process_limit: int = 100, settings: Mapping[str, str] | None = None,
                 start: bool = True, startup_timeout: float = 30.0) -> None:
        self.postfix = need("postfix")
        self.postconf = need("postconf")
        self.workdir = Path(workdir)
        if listen is None:
            listen = f"{POSTFIX_HOST}:{free_port(POSTFIX_HOST)}"
        self.host, self.port = split_address(listen)
        self.mode = mode
        self.startup_timeout = startup_timeout
        self.root = _PrivateRoot(self.workdir, "postfix")
        base = self.root.path
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        self.log_path = base / "postfix.log"
        self.maildir_root = Path(maildir_root) if maildir_root else base / "mail"
        self.mailboxes = tuple(mailboxes)
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        self.log_path.touch()
        shutil.chown(self.log_path, "postfix")
        params = self._main_cf(hostname, mydomain, domains, relayhost, process_limit)
        params.update(settings or {})
        (self.config_dir / "main.cf").write_text(
            "# written by tests/peers.py PostfixInstance\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items()))
        (self.config_dir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(listen=f"{self.host}:{self.port}"))
        self.started = False
        if start:
            self.start()

    def _main_cf(self, hostname: str, mydomain: str, domains: Sequence[str],
                 relayhost: str | None, process_limit: int) -> dict[str, str]:
        p = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "import_environment":
                "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME",
            "myhostname": hostname,
            "mydomain": mydomain,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtputf8_enable": "yes",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_path.parent),
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "default_process_limit": str(process_limit),
            # room for bench/large.py's 50 MiB message (defaults: 10 MB and 51.2 MB)
            "message_size_limit": str(100 * 1024 * 1024),
            "virtual_mailbox_limit": "0",
            "mailbox_size_limit": "0",
            "smtp_bind_address": self.host,
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
        }
        if self.mode == "maildir":
            mailbox_map = ", ".join(f"{a}={a.rpartition('@')[2]}/{a.rpartition('@')[0]}/"
                                    for a in self.mailboxes)
            pw = pwd.getpwnam("nobody")
            p.update({
                "virtual_mailbox_domains": ", ".join(domains),
                "virtual_mailbox_base": str(self.maildir_root),
                "virtual_mailbox_maps": f"inline:{{ {mailbox_map} }}" if self.mailboxes else "",
                "virtual_uid_maps": f"static:{pw.pw_uid}",
                "virtual_gid_maps": f"static:{pw.pw_gid}",
                "virtual_minimum_uid": "1",
            })
            self.maildir_root.mkdir(parents=True, exist_ok=True)
            os.chown(self.maildir_root, pw.pw_uid, pw.pw_gid)
        elif self.mode == "relay":
            if not relayhost:
                raise ValueError("PostfixInstance(mode='relay') needs relayhost='host:port'")
            host, port = split_address(relayhost)
            p.update({"relayhost": f"[{host}]:{port}", "default_transport": "smtp"})
        elif self.mode == "hold":
            p["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        elif self.mode == "discard":
            p["smtpd_end_of_data_restrictions"] = "check_client_access static:DISCARD"
        else:
            raise ValueError(f"unknown PostfixInstance mode {self.mode!r}")
        return p

    # -- lifecycle
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.postfix, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        result = self._run("start")
        if result.returncode != 0:
            raise PeerError(f"postfix -c {self.config_dir} start failed ({result.returncode}):\n"
                            f"{result.stdout}{result.stderr}\n--- postfix.log ---\n{self.log_text()[-3000:]}")
        self.started = True
        try:
            wait_port(self.host, self.port, self.startup_timeout, what="postfix smtpd")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- postfix.log ---\n{self.log_text()[-3000:]}") from None

    @property
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def pids(self) -> list[int]:
        """The master and its live descendants."""
        master = self.master_pid
        return [master, *descendant_pids(master)] if master else []

    def cpu_seconds(self) -> float:
        """CPU used so far by the whole instance (see ``process_tree_cpu_seconds``).

        Postfix's master reaps every daemon it starts, so the time of exited
        smtpd, cleanup, virtual … processes is in the master's cutime/cstime.
        """
        master = self.master_pid
        return process_tree_cpu_seconds(master) if master else 0.0

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop``, then wait until the master and every daemon have exited."""
        if not self.started:
            return
        self.started = False
        pids = self.pids()
        self._run("stop")
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        stragglers = [p for p in pids if _alive(p)]
        _kill_pids(stragglers)
        if stragglers:
            raise PeerError(f"postfix -c {self.config_dir} stop left {stragglers}; killed them")

    def close(self) -> None:
        """stop() and remove a temporary root (its log is kept as workdir/postfix.log)."""
        try:
            self.stop()
        finally:
            self.root.remove(keep=("postfix.log",))

    def __enter__(self) -> PostfixInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it has done
    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def queue_files(self) -> list[Path]:
        return [p for d in QUEUE_DIRS for p in (self.queue_dir / d).rglob("*") if p.is_file()]

    def queue_count(self) -> int:
        return len(self.queue_files())

    def wait_queue_empty(self, timeout: float = 60) -> None:
        wait_for(lambda: self.queue_count() == 0, timeout, f"postfix queue {self.queue_dir} to empty")

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        subprocess.run([need("postqueue"), "-c", str(self.config_dir), "-f"],
                       capture_output=True, timeout=30, check=False)

    def maildir(self, address: str) -> Path:
        user, _, domain = address.rpartition("@")
        return self.maildir_root / domain / user

    def delivered(self, address: str | None = None) -> list[Path]:
        return maildir_files(self.maildir(address) if address else self.maildir_root)


# --------------------------------------------------------------------------- smtp-sink


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

    def __init__(self, workdir: Path, *, listen: str | None = None, dump: bool = False,
                 backlog: int = 1000, max_sessions: int = 1000, extra_args: Sequence[str] = (),
                 start: bool = True) -> None:
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
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
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


# --------------------------------------------------------------------------- black hole


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


def postfix_sasl_settings(auth_socket: Path) -> dict[str, str]:
    """main.cf settings for SASL AUTH in a PostfixInstance, checked by a Dovecot auth socket
    (``DovecotImap(auth_socket=True).auth_socket``): ``PostfixInstance(settings=...)``.
    smtpd then offers ``AUTH PLAIN LOGIN`` (without TLS too: smtpd_tls_auth_only is off)."""
    return {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": str(auth_socket),
    }


# --------------------------------------------------------------------------- smtp-source


class SourceResult(subprocess.CompletedProcess[str]):
    """smtp-source's CompletedProcess plus ``elapsed`` (wall seconds) and ``argv``."""

    elapsed: float = 0.0


def smtp_source(target: str, *, messages: int, sessions: int = 1, keep_connection: bool = False,
                size: int = 4096, sender: str = "source@client.test",
                recipient: str = "alice@example.test", recipients: int = 1,
                helo: str = "client.test", subject: str | None = None,
                extra_args: Sequence[str] = (), timeout: float = 600, check: bool = True,
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
    argv = [program, "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", sender, "-t", recipient, "-M", helo]
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
        raise PeerError(f"smtp-source exited {result.returncode}: {' '.join(argv)}\n"
                        f"{result.stdout}{result.stderr}")
    return result


# --------------------------------------------------------------------------- OpenDKIM


def opendkim_sign(workdir: Path, message: bytes, *, domain: str, selector: str, key_file: Path,
                  algorithm: str = "rsa-sha256", canonicalization: str = "relaxed/simple") -> bytes:
    """``message`` signed by OpenDKIM itself: the ``opendkim`` filter in test mode (``-t``),
    which signs as the milter would and prints the header it would insert. (OpenDKIM's
    ``opendkim-testmsg`` signs only with rsa-sha1, which RFC 8301 forbids verifiers to accept.)
    ``algorithm``: rsa-sha256 or ed25519-sha256 (an Ed25519 key as PKCS#8 PEM)."""
    program = need("opendkim")
    workdir.mkdir(parents=True, exist_ok=True)
    conf, msg = workdir / f"opendkim-{selector}.conf", workdir / f"opendkim-{selector}.eml"
    conf.write_text(f"Domain {domain}\nSelector {selector}\nKeyFile {key_file}\n"
                    f"SignatureAlgorithm {algorithm}\nCanonicalization {canonicalization}\n"
                    "Mode s\nSyslog no\nRequireSafeKeys no\n")
    msg.write_bytes(message)
    done = subprocess.run([program, "-x", str(conf), "-t", str(msg), "-vv"], capture_output=True, timeout=60,
                          check=False)
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    m = re.search(r"### INSHEADER: idx=\d+ hname='([^']+)' hvalue='([^']*)'", out)
    if m is None:
        raise PeerError(f"opendkim did not sign (exit {done.returncode}):\n{out[-2000:]}")
    value = m.group(2).replace("\r\n", "\n").replace("\n", "\r\n")
    return f"{m.group(1)}: {value}\r\n".encode() + message


# --------------------------------------------------------------------------- swaks


def swaks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run swaks with ``args``; the transcript is in ``.stdout``. Never raises on exit status.

    swaks' exit status says where it stopped: 0 all accepted, 23 at MAIL,
    24 at RCPT, 25 at DATA, 26 after the message data, 28 at AUTH, 29 at TLS …; the reply lines are
    ``<** 550 5.1.1 …`` (refused) and ``<-  250 …`` (accepted).
    """
    program = need("swaks")
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- Dovecot


DOVECOT_CONF = """\
# written by tests/peers.py DovecotImap
base_dir = {run}
state_dir = {state}
instance_name = gannet-test-dovecot
log_path = {log}
info_log_path = {log}
protocols = {protocols}
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Dovecot never reads mail as root ("Mail access not allowed for root"), so mail
# processes run as {mail_user}, chrooted into the Maildir root (the chroot is
# entered as root, so the root's ancestors need not be searchable by
# {mail_user}); index and control files stay in the Maildirs (default).
first_valid_uid = 1
mail_uid = {mail_user}
mail_gid = {mail_group}
mail_chroot = {maildir_root}
valid_chroot_dirs = {maildir_root}
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = home=/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
{lmtp_listener}}}
protocol lmtp {{
  # lmtp serves many users in one process and does not chroot: absolute paths,
  # so the Maildir root's ancestors must be searchable by the mail user.
  mail_chroot =
  mail_location = maildir:{maildir_root}/%d/%n
  postmaster_address = postmaster@example.test
}}
"""


class DovecotImap:
    """A private Dovecot serving the Maildirs under ``maildir_root`` (``ROOT/DOMAIN/USER``) over IMAP.

    ``users`` maps full addresses to plain-text passwords (passwd-file with
    ``{PLAIN}``). Dovecot refuses to touch mail as root, and Gannet runs as
    root in the tests, so mail processes run as ``mail_user`` (default
    ``nobody``) chrooted into ``maildir_root``, and ``start()`` hands the tree
    under ``maildir_root`` to that user (``chown -R``; call ``grant_access()``
    again after Gannet delivered more while Dovecot runs). A real deployment
    does the same by running Gannet and Dovecot as one mail user.
    Dovecot keeps its index, control and uidlist files in the Maildirs (its
    default), beside new/ cur/ tmp/; IMAP SELECT moves messages from new/ to
    cur/. ``lmtp=True`` adds an LMTP listener on the same address
    (``lmtp_port``), delivering into the same Maildirs; LMTP does not chroot,
    so give it a ``maildir_root`` the mail user can reach, or none (then
    ``workdir/dovecot/mail``, which it can). Run as
    ``dovecot -c CONF -F`` in the background; ``stop()`` sends SIGTERM to
    that master and waits for its children.
    """

    def __init__(self, workdir: Path, *, users: Mapping[str, str], maildir_root: Path | None = None,
                 listen: str | None = None, lmtp: bool = False, lmtp_listen: str | None = None,
                 mail_user: str = "nobody", auth_socket: bool = False, start: bool = True,
                 startup_timeout: float = 20.0) -> None:
        self.program = need("dovecot")
        self.workdir = Path(workdir)
        self.mail_user = pwd.getpwnam(mail_user)
        if listen is None:
            listen = f"{DOVECOT_HOST}:{free_port(DOVECOT_HOST)}"
        self.host, self.imap_port = split_address(listen)
        self.lmtp_port: int | None = None
        if lmtp or lmtp_listen:
            lmtp_host, self.lmtp_port = split_address(lmtp_listen or f"{self.host}:{free_port(self.host)}")
            if lmtp_host != self.host:
                raise ValueError("DovecotImap: LMTP listens on the IMAP address (one host, one address)")
        self.startup_timeout = startup_timeout
        # Always a short private root: Dovecot's sockets live under base_dir (108-byte limit).
        self.root = _PrivateRoot(self.workdir, "dovecot", force_tmp=True)
        base = self.root.path
        self.maildir_root = Path(maildir_root) if maildir_root else base / "mail"
        self.log_path = base / "dovecot.log"
        self.passwd_path = base / "passwd"
        for sub in ("run", "state"):
            (base / sub).mkdir()
        self.passwd_path.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
        self.passwd_path.chmod(0o640)
        shutil.chown(self.passwd_path, group="dovecot")
        protocols = "imap lmtp" if self.lmtp_port else "imap"
        lmtp_listener = ""
        if self.lmtp_port:
            lmtp_listener = (f"  inet_listener lmtp {{\n    address = {self.host}\n"
                             f"    port = {self.lmtp_port}\n  }}\n")
        self.config_path = base / "dovecot.conf"
        self.config_path.write_text(DOVECOT_CONF.format(
            run=base / "run", state=base / "state", log=self.log_path, protocols=protocols,
            host=self.host, maildir_root=self.maildir_root, passwd=self.passwd_path,
            mail_user=self.mail_user.pw_uid, mail_group=self.mail_user.pw_gid,
            imap_port=self.imap_port, lmtp_listener=lmtp_listener))
        # auth_socket=True: a SASL socket anyone may use, for Postfix's smtpd_sasl_type = dovecot
        # (see postfix_sasl_settings); it checks the same passwd-file as IMAP.
        self.auth_socket: Path | None = None
        if auth_socket:
            self.auth_socket = base / "run" / "auth-postfix"
            with open(self.config_path, "a") as conf:
                conf.write("service auth {\n  unix_listener auth-postfix {\n    mode = 0666\n  }\n}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def grant_access(self) -> None:
        """Give everything under ``maildir_root`` to the mail user (Dovecot reads and moves files)."""
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        self.maildir_root.mkdir(parents=True, exist_ok=True)
        os.chown(self.maildir_root, uid, gid)
        for dirpath, dirnames, filenames in os.walk(self.maildir_root):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

    def start(self) -> None:
        self.grant_access()
        out = open(self.root.path / "dovecot.out", "ab")  # noqa: SIM115 (closed below)
        with out:
            self.proc = subprocess.Popen([self.program, "-c", str(self.config_path), "-F"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            for port, what in ((self.imap_port, "imap"), (self.lmtp_port, "lmtp")):
                if port:
                    wait_port(self.host, port, self.startup_timeout, proc=self.proc, what=f"dovecot {what}")
            if self.auth_socket is not None:
                socket_path = self.auth_socket
                wait_for(socket_path.exists, self.startup_timeout, f"dovecot auth socket {socket_path}")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- dovecot.log ---\n{self.log_text()[-3000:]}") from None

    @property
    def imap_address(self) -> tuple[str, int]:
        return self.host, self.imap_port

    @property
    def lmtp_address(self) -> tuple[str, int]:
        if self.lmtp_port is None:
            raise PeerError("DovecotImap was started without lmtp=True")
        return self.host, self.lmtp_port

    @property
    def lmtp_socket(self) -> Path:
        """The LMTP unix socket (a ``unix:`` destination): root's, mode 0600 (the suite is root)."""
        if self.lmtp_port is None:
            raise PeerError("DovecotImap was started without lmtp=True")
        return self.root.path / "run" / "lmtp"

    def log_text(self) -> str:
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            with contextlib.suppress(OSError):
                text += (self.root.path / name).read_text(errors="replace")
        return text

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        pids = descendant_pids(self.proc.pid) if self.proc.poll() is None else []
        _terminate(self.proc, timeout)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_pids(p for p in pids if _alive(p))
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.root.remove(keep=("dovecot.log",))

    def __enter__(self) -> DovecotImap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- PostgreSQL

POSTGRES_HOST = "127.0.0.32"  # PostgresServer's loopback address
POSTGRES_USER = "gannet"  # the superuser initdb creates; trusted on the socket and on loopback


def postgres_bin(program: str) -> str:
    """A PostgreSQL server program (initdb, postgres, pg_ctl): Debian keeps them in
    /usr/lib/postgresql/VERSION/bin, off PATH; the newest version wins."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
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

    def __init__(self, workdir: Path, *, settings: Mapping[str, str] | None = None,
                 start: bool = True) -> None:
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
                [self.initdb, "-D", str(self.data), "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8",
                 "--locale=C", "--no-sync"],
                capture_output=True, text=True, cwd="/", env=self._env(), **self._run_as())
            if done.returncode != 0:
                raise PeerError(f"initdb failed ({done.returncode}): {done.stderr or done.stdout}")
        args = [self.postgres, "-D", str(self.data), "-k", str(self.root.path), "-h", self.host,
                "-p", str(self.port)]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd="/", env=self._env(), start_new_session=True, **self._run_as())
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
            cur = conn.execute(statement)  # type: ignore[arg-type]  (test-supplied SQL)
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


# --------------------------------------------------------------------------- dnsmasq

DNS_HOST = "127.0.0.53"  # DnsServer's loopback address (not a systemd-resolved stub: the port is ours)

# name → {rdtype: [values]}; see DnsServer for the value of each type
DnsRecords = Mapping[str, Mapping[str, Sequence[Any]]]


def free_udp_tcp_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (a DNS server listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise PeerError(f"no port free for both TCP and UDP on {host}")


def _dns_quote(text: str) -> str:
    """A dnsmasq config-file string: quoted, with backslash escapes (commas and '#' stay literal)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class _ServfailResponder:
    """A UDP "nameserver" that answers SERVFAIL to everything; dnsmasq forwards the
    ``servfail`` domains to it and passes the SERVFAIL on. (dnsmasq itself never
    says SERVFAIL outside DNSSEC: an unreachable upstream is REFUSED, a silent one
    no answer at all.)"""

    def __init__(self, host: str) -> None:
        import threading

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.answered = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"servfail-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.exception
        import dns.message
        import dns.rcode

        while not self._stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
                response = dns.message.make_response(dns.message.from_wire(data))
            except (TimeoutError, dns.exception.DNSException):
                continue
            except OSError:
                return
            response.set_rcode(dns.rcode.SERVFAIL)
            with contextlib.suppress(OSError):
                self.sock.sendto(response.to_wire(), peer)
                self.answered += 1

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()


class DnsServer:
    """dnsmasq on its own loopback address, answering from records given as Python data.

    ``records`` maps a name to ``{rdtype: [values]}``::

        {"example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
                          "TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
         "mx1.example.test": {"A": ["127.0.0.10"], "AAAA": ["::10"]},
         "nullmx.test": {"MX": [(0, ".")]},                       # RFC 7505 null MX
         "10.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]}}

    Values: MX ``(preference, host)`` (host ``"."`` is the null MX, served as a
    raw RR); A/AAAA an address (``--host-record``, which also answers the
    PTR for that address); TXT a string (one character-string, split by
    dnsmasq into 255-byte pieces) or a sequence of strings (one record with
    those strings); PTR and CNAME a name (a CNAME target must itself be local
    data); any other type the RR's text form (``"10 5 25 mx.example.test"``
    for SRV), served as a raw RR through dnspython's wire form. Every record
    has TTL ``ttl``. Names under ``.test``, ``.arpa`` and the top-level domain
    of any record are local: a name there without data is NXDOMAIN, and a name
    with data but not of the asked type is NODATA. Other names are REFUSED.
    Names in ``servfail`` (and their subdomains) get SERVFAIL, from
    ``_ServfailResponder`` via dnsmasq's forwarding.

    dnsmasq runs in the foreground as root (it drops nothing), reads only its
    own ``workdir/dnsmasq.conf`` (never /etc/dnsmasq.conf, /etc/hosts or
    /etc/resolv.conf), keeps no cache (every answer is fresh, so a restart
    with new records takes effect at once), and logs every query to
    ``workdir/dnsmasq.log`` (``queries()`` reads them back). ``update()`` and
    ``set_records()`` rewrite the config and restart it on the same port, so a
    Resolver pointed at ``nameserver`` keeps working.
    """

    def __init__(self, workdir: Path, *, address: str = DNS_HOST, records: DnsRecords | None = None,
                 servfail: Sequence[str] = (), ttl: int = 300, start: bool = True,
                 port: int | None = None) -> None:
        self.program = need("dnsmasq")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = address
        # port=53 serves programs that only read /etc/resolv.conf (tests/interop/test_dkim_sign.py)
        self.port = port or free_udp_tcp_port(address)
        self.ttl = ttl
        self.records: dict[str, dict[str, list[Any]]] = {}
        self.servfail = tuple(servfail)
        self._set(records or {})
        self.conf_path = self.workdir / "dnsmasq.conf"
        self.log_path = self.workdir / "dnsmasq.log"
        self.out_path = self.workdir / "dnsmasq.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self._servfail: _ServfailResponder | None = None
        if start:
            self.start()

    @property
    def nameserver(self) -> str:
        """For Resolver(nameservers=[...]) and ``[dns] nameservers``: ``127.0.0.53:PORT``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _set(self, records: DnsRecords) -> None:
        self.records = {}
        self._merge(records)

    def _merge(self, records: DnsRecords) -> None:
        for name, by_type in records.items():
            entry = self.records.setdefault(name.rstrip(".").lower(), {})
            for rdtype, values in by_type.items():
                entry[rdtype.upper()] = list(values)

    def config_text(self) -> str:
        lines = ["no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={self.host}",
                 f"port={self.port}", "user=root", "group=root", "pid-file=", "cache-size=0",
                 f"local-ttl={self.ttl}", "log-queries", f"log-facility={self.log_path}"]
        zones = {"test", "arpa"} | {name.rsplit(".", 1)[-1] for name in self.records}
        lines += [f"local=/{zone}/" for zone in sorted(zones)]
        if self._servfail is not None:
            upstream = f"[{self.host}]" if ":" in self.host else self.host
            lines += [f"server=/{d.rstrip('.')}/{upstream}#{self._servfail.port}" for d in self.servfail]
        for name, by_type in self.records.items():
            for rdtype, values in by_type.items():
                lines += [self._record_line(name, rdtype, value) for value in values]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _record_line(name: str, rdtype: str, value: Any) -> str:
        import dns.name
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype

        if rdtype in ("A", "AAAA"):
            return f"host-record={name},{value}"
        if rdtype == "MX" and str(value[1]).rstrip(".") != "":
            return f"mx-host={name},{str(value[1]).rstrip('.')},{int(value[0])}"
        if rdtype == "TXT":
            strings = [value] if isinstance(value, str) else list(value)
            return f"txt-record={name}," + ",".join(_dns_quote(s) for s in strings)
        if rdtype == "PTR":
            return f"ptr-record={name},{str(value).rstrip('.')}"
        if rdtype == "CNAME":
            return f"cname={name},{str(value).rstrip('.')}"
        text = f"{value[0]} {value[1]}" if rdtype == "MX" else str(value)
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text,
                                    origin=dns.name.root, relativize=False)
        return f"dns-rr={name},{int(rdata.rdtype)},{rdata.to_wire().hex()}"

    def start(self) -> None:
        if self.servfail and self._servfail is None:
            self._servfail = _ServfailResponder(self.host)
        self.conf_path.write_text(self.config_text())
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.program, "--keep-in-foreground", f"--conf-file={self.conf_path}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.host, self.port, 10, proc=self.proc, what="dnsmasq")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- dnsmasq.out ---\n{self.log_text()[-3000:]}") from None

    def set_records(self, records: DnsRecords, *, servfail: Sequence[str] | None = None) -> None:
        """Replace every record (and the SERVFAIL domains, if given); restart if running."""
        self._set(records)
        if servfail is not None:
            self.servfail = tuple(servfail)
        self._restart_if_running()

    def update(self, records: DnsRecords) -> None:
        """Add records: each (name, type) given replaces that name's records of that type."""
        self._merge(records)
        self._restart_if_running()

    def _restart_if_running(self) -> None:
        if self.proc is not None:
            self._stop_dnsmasq()
            self.start()

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query dnsmasq logged so far, in order."""
        return re.findall(r"query\[(\w+)\] (\S+) from ", self.log_text())

    def log_text(self) -> str:
        text = ""
        for path in (self.out_path, self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text

    def _stop_dnsmasq(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 5)
            self.proc = None

    def stop(self) -> None:
        self._stop_dnsmasq()
        if self._servfail is not None:
            self._servfail.stop()
            self._servfail = None

    close = stop

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- HAProxy

HAPROXY_HOST = "127.0.0.8"  # HAProxy's frontend address

HAPROXY_CFG = """\
# written by tests/peers.py HAProxy
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

    def __init__(self, workdir: Path, *, servers: Sequence[str], send_proxy: str | None = "v2",
                 balance: str = "roundrobin", check: bool = False, listen: str | None = None,
                 start: bool = True) -> None:
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
        self.config_path.write_text(HAPROXY_CFG.format(
            pidfile=self.pid_path, host=self.host, port=self.port, balance=balance,
            servers="\n".join(lines) + "\n"))
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        check = subprocess.run([self.program, "-c", "-f", str(self.config_path)], capture_output=True,
                               text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise PeerError(f"haproxy -c refused {self.config_path}:\n{check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.program, "-db", "-f", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
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
