"""A Gannet cluster for tests and benchmarks: PostgreSQL, N nodes, HAProxy in front.

Used by tests/interop/test_cluster.py and bench/cluster.py (through
tests/peers.py's programs):

- ``Cluster``: nodes on 127.0.0.2, 127.0.0.3, 127.0.0.4 … (one loopback
  address per node, as DESIGN.md asks), each ``gannet serve`` with its own
  data_dir and the same ``[queue] url`` (one PostgreSQL database), an mx
  listener with ``proxy_protocol = true``; HAProxy on 127.0.0.8 passing
  connections to them with ``send-proxy-v2`` and health checks; mail for
  other domains relayed to a smarthost (an smtp-sink). ``kill(i)`` is a crash:
  SIGKILL to the node's whole process group (the serve process and its
  deliver-worker child); ``restart(i)`` starts it again on the same address.
- ``SourceLanes``: Postfix's smtp-source as N one-session processes ("lanes")
  that together send M messages, and the exact set of messages that got their
  250. smtp-source exits at the first lost connection (a killed node); a lane
  then starts a new process for what it has left. Each process is run with
  ``-s 1 -c``: it prints a counter each time it sends the final "." and writes
  ``Message-Id: <PID.FD.COUNT@HELO>`` with COUNT = messages it has left
  (M-1 for its first, M-k for its k-th). For a process that exited 0 all M
  were acknowledged; for one that died after c dots, messages 1..c-1 were
  acknowledged (a later one was started, which smtp-source does only after a
  250), and message c is *uncertain* (its "." was sent; the reply may not
  have come). Nothing is ever re-sent, so an uncertain message is delivered
  at most once, or not at all.

Every process started here is stopped by ``close()`` (also on errors): the
cluster is a context manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers

NODE_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
MESSAGE_ID = re.compile(r"<([0-9a-f]+)\.[0-9a-f]+\.([0-9a-f]+)@([^>]+)>")


def node_config(workdir: Path, host: str, index: int, queue_url: str, smarthost: str,
                delivery: dict[str, Any] | None = None) -> dict[str, Any]:
    """One node's config: a proxy_protocol mx listener, the shared queue, relay to the smarthost."""
    return {
        "hostname": f"node{index}.example.test",
        "data_dir": str(workdir / "var"),
        "listen": [{"address": f"{host}:{peers.free_port(host)}", "mode": "mx", "proxy_protocol": True}],
        # node: this node's name in the queue (lease owners are "node2/smtp", …); SQLite has none
        "queue": {"url": queue_url, **({"node": f"node{index}"} if queue_url.startswith("postgres") else {})},
        "relay": {"local_domains": ["example.test"], "trusted_networks": ["127.0.0.0/8"],
                  "smarthost": smarthost},
        "mailboxes": {"maildir": str(workdir / "mail" / "{domain}" / "{user}"),
                      "users_file": str(workdir / "users")},
        "delivery": {"retry": ["2s"], "sweep_interval": "2s", **(delivery or {})},
        "admin": {"address": f"{host}:{peers.free_port(host)}"},
    }


class Cluster:
    """N Gannet nodes on one PostgreSQL queue, behind HAProxy (see the module docstring)."""

    def __init__(self, workdir: Path, *, queue_url: str, smarthost: str, nodes: int = 3,
                 balance: str = "roundrobin", delivery: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.nodes: list[peers.GannetProcess] = []
        self.haproxy: peers.HAProxy | None = None
        try:
            for i in range(nodes):
                host = NODE_HOSTS[i]
                work = self.workdir / f"node{i + 1}"
                config = node_config(work, host, i + 1, queue_url, smarthost, delivery)
                self.nodes.append(peers.GannetProcess(work, peers.to_toml(config), start=False))
            # Start one first: it creates the schema; the others find it done.
            for node in self.nodes:
                node.start()
            self.haproxy = peers.HAProxy(self.workdir / "haproxy", servers=[n.target() for n in self.nodes],
                                         send_proxy="v2", balance=balance, check=True)
        except BaseException:
            self.close()
            raise

    @property
    def target(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.target

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (0-based) and its children, as a power cut would."""
        node = self.nodes[index]
        if node.proc is None or node.proc.poll() is not None:
            return
        kids = peers.descendant_pids(node.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)  # serve leads its own group (start_new_session)
        for pid in kids:  # in case a child moved to a group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.proc.wait(10)
        peers.wait_for(lambda: not any(peers.alive(p) for p in kids), 10, "the killed node's children")

    def restart(self, index: int) -> None:
        self.nodes[index].start()

    def cli(self, index: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.nodes[index].cli(*args, check=check)

    def log_text(self) -> str:
        return "\n".join(n.log_text() for n in self.nodes)

    def close(self) -> None:
        errors = []
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            try:
                if node.running:
                    node.stop()
            except peers.PeerError as exc:
                errors.append(str(exc))
        if errors:
            raise peers.PeerError("; ".join(errors))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- smtp-source lanes


@dataclass
class SourceRun:
    """One smtp-source process of a lane."""

    pid: int
    messages: int
    status: int = 0
    dots: int = 0  # the -c counter: final "." sent
    stderr: str = ""

    def acknowledged(self) -> list[int]:
        """COUNT values (see the module docstring) of the messages that got a 250."""
        done = self.messages if self.status == 0 else max(self.dots - 1, 0)
        return [self.messages - k for k in range(1, done + 1)]

    def uncertain(self) -> list[int]:
        return [self.messages - self.dots] if self.status != 0 and self.dots else []


@dataclass
class SourceLanes:
    """``lanes`` smtp-source processes, one session each, sending ``messages`` in all."""

    target: str
    messages: int
    lanes: int = 20
    size: int = 2048
    recipient: str = "load@sink.test"
    sender: str = "source@client.test"
    helo: str = "source.client.test"
    timeout: float = 600.0
    runs: list[SourceRun] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _procs: set[subprocess.Popen[str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        program = peers.need("smtp-source")
        share, extra = divmod(self.messages, self.lanes)
        for lane in range(self.lanes):
            quota = share + (1 if lane < extra else 0)
            t = threading.Thread(target=self._lane, args=(program, quota), name=f"smtp-source-{lane}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _lane(self, program: str, quota: int) -> None:
        deadline = time.monotonic() + self.timeout
        failures = 0
        while quota > 0 and not self._stop.is_set() and time.monotonic() < deadline:
            argv = [program, "-c", "-s", "1", "-m", str(quota), "-l", str(self.size), "-f", self.sender,
                    "-t", self.recipient, "-M", self.helo, self.target]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            with self._lock:
                self._procs.add(proc)
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            with self._lock:
                self._procs.discard(proc)
            counters = re.findall(r"\d+", out)
            dots = int(counters[-1]) if counters else 0
            run = SourceRun(proc.pid, quota, proc.returncode, dots, err[-500:])
            with self._lock:
                self.runs.append(run)
            quota -= run.messages if run.status == 0 else run.dots
            if run.status != 0:
                failures += 1
                if failures > 50:
                    return  # something is wrong beyond a killed node; the test will say what
                time.sleep(0.2)

    def wait(self) -> None:
        for t in self._threads:
            t.join()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self.wait()

    @property
    def dots(self) -> int:
        """Messages whose final "." was sent so far (finished processes only)."""
        with self._lock:
            return sum(r.messages if r.status == 0 else r.dots for r in self.runs)

    def acknowledged(self) -> set[tuple[int, int]]:
        """(PID, COUNT) of every message that got a 250."""
        return {(r.pid, c) for r in self.runs for c in r.acknowledged()}

    def uncertain(self) -> set[tuple[int, int]]:
        return {(r.pid, c) for r in self.runs for c in r.uncertain()}

    def failed_runs(self) -> list[SourceRun]:
        return [r for r in self.runs if r.status != 0]


def source_keys(message_ids: Iterable[str], helo: str) -> list[tuple[int, int]]:
    """(PID, COUNT) of each smtp-source Message-Id from HELO ``helo`` (others are skipped)."""
    keys = []
    for mid in message_ids:
        m = MESSAGE_ID.search(mid)
        if m and m.group(3) == helo:
            keys.append((int(m.group(1), 16), int(m.group(2), 16)))
    return keys


def dumped_message_ids(paths: Sequence[Path]) -> list[str]:
    """Message-IDs of smtp-sink's dump files (its X-* lines come first, then the message)."""
    ids = []
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if raw in (b"\n", b"\r\n"):
                    break
                if raw[:11].lower() == b"message-id:":
                    ids.append(raw[11:].decode("ascii", "replace").strip())
                    break
    return ids
