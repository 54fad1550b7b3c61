"""Processes seen through /proc: CPU seconds, RSS, children, liveness, and stopping them.

For the benchmarks' CPU and memory figures and for peers that must make sure every
daemon they started has exited. It reads /proc and signals only the PIDs it is
given; it must never look processes up by name or signal anything else.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rindex(")") + 2 :].split()


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
        process_cpu_seconds(kid, children=False) for kid in descendant_pids(pid)
    )


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


def spawn_logged(
    args: list[str], log: Path, *, truncate: bool = False, **popen: Any
) -> subprocess.Popen[Any]:
    """Start a peer daemon in the foreground, in a session of its own (so a stop
    reaches nothing else), stdout and stderr into ``log`` (appended unless
    ``truncate``). ``popen``: further subprocess.Popen arguments (cwd, env …)."""
    with open(log, "wb" if truncate else "ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )


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
