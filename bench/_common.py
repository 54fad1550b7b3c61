"""Shared pieces of the benchmarks in bench/: where the peers are, how Gannet is configured, tables.

The benchmarks start the same real peers as the tests, through tests/peers/
(Gannet as ``python -m gannet serve``, a private Postfix, smtp-source).
Every run gets a fresh directory ``/tmp/gannet-bench-NAME-XXXX`` (world-
searchable, so Postfix's and Dovecot's users can reach it), removed at the
end unless ``--keep``. Nothing listens outside loopback: Gannet on 127.0.0.1,
Postfix on 127.0.0.2, each on a free port.
"""

from __future__ import annotations

import atexit
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import peers  # noqa: E402  (tests/peers/, found through the line above)

BENCH_USER = "alice@example.test"
BENCH_PASSWORD = "bench-password"


T = TypeVar("T")

def require(*programs: str) -> None:
    """Exit with a clear message when a program the benchmark needs is missing."""
    for program in programs:
        if not peers.find_program(program):
            package = peers.PACKAGES.get(program, "that provides it")
            sys.exit(f"bench: {program} is not installed; install the Debian package {package}")


# When the last benchmark finished removing its work directories (touched at exit).
CLEANUP_STAMP = Path("/tmp/gannet-bench-cleanup")
# How long after such a cleanup file creation stays slow on this ext4 (see `remove`): the
# freed inodes count as recent for 60 s once their blocks are written back (~30 s), 300 s
# while still dirty. Measured: the first run after a cleanup spent 0.3 ms a message more in
# the kernel (the delivery worker's file creation) than the runs after it.
SETTLE_SECONDS = 120.0
_settled = False


def settle() -> None:
    """Wait until the previous benchmark's cleanup no longer slows file creation, so that the
    first run of this one (always the same server, or checks off) is not the one that pays."""
    global _settled
    if _settled:
        return
    _settled = True
    try:
        age = time.time() - CLEANUP_STAMP.stat().st_mtime
    except FileNotFoundError:
        return
    if 0 <= age < SETTLE_SECONDS:
        wait = SETTLE_SECONDS - age
        print(f"(waiting {wait:.0f} s: the last benchmark removed its files {age:.0f} s ago;"
              " see _common.remove)", file=sys.stderr, flush=True)
        time.sleep(wait)


_stamp_registered = False


def workdir(name: str) -> Path:
    settle()
    path = Path(tempfile.mkdtemp(prefix=f"gannet-bench-{name}-", dir="/tmp"))
    path.chmod(0o755)
    return path


def remove(path: Path, keep: bool) -> None:
    """Remove a run's work directory when the benchmark exits, not now.

    This host's root filesystem is ext4 without a journal, where creating a
    file scans past every inode freed in the last one to five minutes
    (ext4's `recently_deleted`; perf showed it at a fifth of the delivery
    worker's CPU). Removed between runs, one run's 20,000 files would make
    the next run pay for them, whichever server that is. The next benchmark
    waits for them too (`settle`): the stamp is touched after the last removal.
    """
    if keep:
        print(f"(kept {path})")
    else:
        global _stamp_registered
        if not _stamp_registered:  # atexit runs the last registered first: the stamp comes last
            _stamp_registered = True
            atexit.register(CLEANUP_STAMP.touch)
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def gannet_config(work: Path, *, smtp: dict[str, Any] | None = None, relay: dict[str, Any] | None = None,
                  delivery: dict[str, Any] | None = None, queue_url: str | None = None,
                  sections: dict[str, Any] | None = None) -> str:
    """Gannet as the benchmarks run it: one mx listener, local domain example.test, Maildirs, no TLS.
    `relay` is merged into the default [relay]; `sections` (e.g. [dns], [mailauth]) are added whole."""
    host = peers.GANNET_HOST
    config: dict[str, Any] = {
        "hostname": "mx.example.test",
        "data_dir": str(work / "var"),
        "listen": [{"address": f"{host}:{peers.free_port(host)}", "mode": "mx"}],
        "relay": {"local_domains": ["example.test"], "trusted_networks": ["127.0.0.0/8"]},
        "mailboxes": {"maildir": str(work / "mail" / "{domain}" / "{user}"),
                      "users_file": str(work / "users")},
        "admin": {"address": f"{host}:{peers.free_port(host)}"},
    }
    if smtp:
        config["smtp"] = smtp
    if relay:
        config["relay"].update(relay)
    if delivery:
        config["delivery"] = delivery
    if queue_url:
        config["queue"] = {"url": queue_url}
    config.update(sections or {})
    return peers.to_toml(config)


# The checkout a benchmark's Gannet runs from: this one unless bench/ab.py set another.
_tree: Path | None = None


def use_tree(tree: Path | None) -> None:
    """Run the Gannets started from now on from the checkout at `tree` (None: this one)."""
    global _tree
    _tree = tree


def gannet_env() -> dict[str, str] | None:
    """The environment that makes a Gannet process import `use_tree`'s checkout, if one is set."""
    return {"PYTHONPATH": str(_tree)} if _tree is not None else None


def start_gannet(work: Path, *, smtp: dict[str, Any] | None = None, nofile: int | None = None,
                 relay: dict[str, Any] | None = None, delivery: dict[str, Any] | None = None,
                 queue_url: str | None = None, sections: dict[str, Any] | None = None,
                 start: bool = True) -> peers.GannetProcess:
    """A fresh Gannet in ``work/gannet`` with the account alice@example.test (`gannet_config`'s arguments);
    `start=False` leaves it stopped, for a caller that fills its data directory first."""
    config = gannet_config(work / "gannet", smtp=smtp, relay=relay, delivery=delivery, queue_url=queue_url,
                           sections=sections)
    g = peers.GannetProcess(work / "gannet", config, start=False, nofile=nofile, env=gannet_env())
    g.cli("users", "add", BENCH_USER, "--password-stdin", input=BENCH_PASSWORD + "\n")
    if start:
        g.start()
    return g


class BenchQueue:
    """Where Gannet keeps its queue in a benchmark (``--queue-url``): SQLite in its
    data directory (None, the default); ``"postgres"``, a private PostgreSQL from
    the installed binaries (peers.PostgresServer, durable defaults: fsync on,
    synchronous_commit on), a fresh database per run, its CPU counted with
    Gannet's; or a ``postgresql://`` URL of a database the benchmark may create
    schemas in (a fresh schema per run; that server's CPU is not counted)."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.server: peers.PostgresServer | None = None
        self.work: Path | None = None
        if spec == "postgres":
            self.work = workdir("postgres")
            self.server = peers.PostgresServer(self.work)
            atexit.register(self.close)  # even when a run fails: never leave a postmaster behind
        elif spec is not None and not spec.startswith(("postgresql://", "postgres://")):
            sys.exit(f"bench: --queue-url takes postgres or a postgresql:// URL, not {spec!r}")

    @property
    def label(self) -> str:
        return "sqlite" if self.spec is None else "postgresql"

    def url(self, name: str) -> str | None:
        """The queue URL for one run (None: SQLite), empty."""
        if self.spec is None:
            return None
        if self.server is not None:
            return self.server.create_database(name)
        import psycopg

        with psycopg.connect(self.spec, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]
            conn.execute(f'CREATE SCHEMA "{name}"')  # type: ignore[arg-type]
        return self.spec + ("&" if "?" in self.spec else "?") + f"options=-csearch_path%3D{name}"

    def cpu_seconds(self) -> float:
        """CPU of the private PostgreSQL (postmaster and its backends); 0 otherwise."""
        if self.server is None or self.server.proc is None:
            return 0.0
        return peers.process_tree_cpu_seconds(self.server.proc.pid)

    def close(self) -> None:
        """Stop the private PostgreSQL and remove its files (again: a no-op)."""
        if self.server is not None:
            self.server.close()
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)


def start_postfix(work: Path, *, process_limit: int = 100) -> peers.PostfixInstance:
    """A fresh private Postfix delivering alice@example.test into a Maildir with virtual(8)."""
    return peers.PostfixInstance(work / "postfix", mode="maildir", mailboxes=(BENCH_USER,),
                                 process_limit=process_limit)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, right-aligned numbers, for the terminal and for bench/README.md."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        padded = (c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append("  ".join(padded))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _numeric(c: str) -> bool:
    return c.replace(",", "").replace(".", "").replace("x", "").replace("-", "").isdigit()


# What each of Gannet's child processes is, by a word of its command line.
_ROLES = (
    ("sqlite_enqueue_child", "enqueue writer"),
    ("deliver-worker", "delivery worker"),
    ("mailauth.checker", "checks"),
)


def cpu_by_process(root: int) -> Counter[str]:
    """CPU seconds of Gannet's process tree by role: the server (`root`) and its
    children (enqueue writer, delivery worker, checks). A child that exited
    counts as the server's: its time moved into the server's cutime/cstime
    when it was reaped."""
    split: Counter[str] = Counter(server=peers.process_cpu_seconds(root))
    for pid in peers.descendant_pids(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile: its time is the server's now
            continue
        role = next((name for word, name in _ROLES if word in command), "other")
        split[role] += peers.process_cpu_seconds(pid, children=False)
    return split


def split_text(split: dict[str, float], messages: int) -> str:
    """'server 0.72, enqueue writer 0.41, …': `cpu_by_process`'s seconds as ms a message, largest first."""
    ordered = sorted(split.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {1000 * seconds / messages:.2f}" for name, seconds in ordered if seconds > 0)


_WRITE_LOCK = re.compile(
    r"(server|delivery worker) queue writer: .*? waits for the other process \(([\d.]+)s\), "
    r"held the write lock ([\d.]+)s"
)


def write_lock(log_text: str) -> dict[str, tuple[float, float]]:
    """From Gannet's log after it stopped (the writers' shutdown summaries, SQLite
    queue): {"server" | "delivery worker": (seconds holding the queue's write lock,
    seconds waiting for it)}; the last summary of each. The server's counts its
    enqueue writer process's."""
    found: dict[str, tuple[float, float]] = {}
    for role, waited, held in _WRITE_LOCK.findall(log_text):
        found[role] = (float(held), float(waited))
    return found


def write_lock_text(lock: dict[str, tuple[float, float]], seconds: float) -> str:
    """'held 74 % of the run (delivery worker 28 %, server 46 %); waited for it: delivery worker 1.8 s,
    server 3.1 s': the roles in the order their lines came in the log."""
    if not lock or seconds <= 0:
        return "not in the log"
    share = {role: 100 * held / seconds for role, (held, _) in lock.items()}
    held_text = ", ".join(f"{role} {pct:.0f} %" for role, pct in share.items())
    waits = ", ".join(f"{role} {waited:.1f} s" for role, (_, waited) in lock.items())
    return f"held {sum(share.values()):.0f} % of the run ({held_text}); waited for it: {waits}"


def children_cpu() -> float:
    """user+sys of this process's reaped children (smtp-source, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def accept_load(target: str, *, sessions: int, style: str, messages: int, size: int) -> tuple[float, float]:
    """accept.py's load: smtp-source sends `messages` of `size` body bytes to BENCH_USER over
    `sessions`, a connection per message (`style` "one") or all on one (`"many"`, -d).
    Returns its wall seconds and its own CPU seconds."""
    before = children_cpu()
    result = peers.smtp_source(target, messages=messages, sessions=sessions,
                               keep_connection=(style == "many"), size=size, sender="bench@client.test",
                               recipient=BENCH_USER, helo="client.test", timeout=3600)
    return result.elapsed, children_cpu() - before


def median_by(items: list[T], key: Callable[[T], float]) -> T:
    """The middle item by `key` (the lower middle for an even count)."""
    ordered = sorted(items, key=key)
    return ordered[(len(ordered) - 1) // 2]


def pair_ratios(ours: list[float], theirs: list[float]) -> str:
    """'1.52x' for one pair; 'MEDIANx (a/b/c)' for several: run i of ours over run i of theirs."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    if not ratios:
        return ""
    middle = sorted(ratios)[(len(ratios) - 1) // 2]
    if len(ratios) == 1:
        return f"{middle:.2f}x"
    return f"{middle:.2f}x ({'/'.join(f'{r:.2f}' for r in ratios)})"


PROFILER_ENV = "BENCH_PROFILER"  # "perf" for Linux perf instead of py-spy (see Profiler)


class Profiler:
    """A sampling profiler on a process until stopped; ``summary()`` says where the samples fell.

    py-spy by default: Python functions, self and inclusive (collapsed stacks in
    `output`). With ``BENCH_PROFILER=perf`` in the environment, Linux perf
    (``perf record -g``, 499 Hz) instead: where the CPU goes below Python, by
    shared object (libpython, the kernel, uvloop, libc, OpenSSL) and by symbol,
    which py-spy files under the Python frame that called into C (uvloop's
    ``run`` above all). Its data stays in ``output`` with ``.perf`` for
    ``perf report -i``."""

    def __init__(self, pid: int, output: Path) -> None:
        self.perf = os.environ.get(PROFILER_ENV) == "perf"
        self.output = output.with_suffix(".perf") if self.perf else output
        if self.perf:
            self.program = peers.find_program("perf") or "perf"
            argv = [self.program, "record", "-F", "499", "-g", "-p", str(pid), "-o", str(self.output)]
        else:
            self.program = peers.find_program("py-spy") or str(Path(sys.executable).parent / "py-spy")
            argv = [self.program, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                    "--function", "--nonblocking", "--output", str(output)]
        self.errors = output.with_suffix(".perf.log" if self.perf else ".py-spy.log")
        with self.errors.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def summary(self, top: int = 15) -> str:
        if not self.output.exists():
            # py-spy 0.4.3 cannot read CPython 3.11.7 here ("Failed to find python
            # version from target process"); pyproject pins the bench to < 0.4.
            said = self.errors.read_text(errors="replace").strip().splitlines()
            return f"the profiler wrote no samples: {said[0] if said else 'no message'} (see {self.errors})"
        return self._perf_summary(top) if self.perf else self._py_spy_summary(top)

    def _perf_summary(self, top: int) -> str:
        def report(sort: str) -> list[list[object]]:
            argv = [self.program, "report", "-i", str(self.output), "--no-children", "-g", "none",
                    "--sort", sort, "--stdio"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            rows: list[list[object]] = []
            for line in done.stdout.splitlines():  # "    73.09%  libpython3.11.so.1.0  [.] _PyEval_..."
                share, _, what = line.strip().partition(" ")
                if share.endswith("%") and what.strip():
                    rows.append([share, " ".join(what.split())[:120]])
            return rows[:top]
        by_object = table(["share", "object"], report("dso"))
        by_symbol = table(["share", "symbol"], report("dso,sym"))
        return f"perf samples in {self.output}\n\nby shared object:\n{by_object}\n\nby symbol:\n{by_symbol}"

    def _py_spy_summary(self, top: int) -> str:
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in self.output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            total += n
            own[frames[-1]] += n
            for frame in {f for f in frames if "gannet/" in f}:
                inclusive[frame] += n
        if not total:
            return "no samples"

        def rows(c: Counter[str]) -> list[list[object]]:
            return [[f"{100 * n / total:.1f}%", frame[:120]] for frame, n in c.most_common(top)]
        return (f"{total} samples\n\nself (top of stack):\n{table(['share', 'function'], rows(own))}"
                f"\n\ninclusive, Gannet functions:\n{table(['share', 'function'], rows(inclusive))}")
