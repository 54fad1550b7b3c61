"""A child process ends with its server: `exit_with_parent` at start-up.

Used by the delivery worker (SIGTERM: a graceful stop) and the queue's enqueue
writer process (SIGKILL: nobody waits for its answers any more, and it must
not commit anything after a restarted server's crash recovery has begun).

Why: the worker learns of its server's end by EOF on the wake pipe, but only
once it watches the pipe — after it took `data_dir/delivery.lock` and opened
the store. A worker waiting for that lock (its predecessor still finishing)
or for an unreachable database when its server is SIGKILLed would be left
behind, an orphan holding the lock against the next server's worker.

How: Linux's `prctl(PR_SET_PDEATHSIG, SIGTERM)` (via ctypes; no library wraps
it for us in the standard library): the kernel sends SIGTERM the moment the
parent dies, whatever the worker is doing — blocked in `flock` in an executor
thread, or in a stalled event loop — and it costs nothing while it runs.
Until the worker installs its handler, SIGTERM's default action ends it at
once (it holds nothing yet); afterwards it is the usual graceful stop. Chosen
over polling `getppid()` in the lock wait, which would cover that one wait
only, and only once per poll interval.

The race: a parent that died before the prctl call sends nothing, so the
worker then compares `getppid()` with the PID its server passed
(`--parent-pid`): re-parented already means the server is gone. Caveat (man
2 prctl): the signal comes when the *thread* that forked us ends; `serve`
starts the worker from its event loop's thread, the main one, which ends only
with the process.

Must never raise: without prctl (not Linux) the wake pipe is still watched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger("gannet")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(
    parent_pid: int | None, *, sig: signal.Signals = signal.SIGTERM, who: str = "delivery worker"
) -> bool:
    """Ask for `sig` when the parent dies. False when it is already gone (the
    caller exits at once); True otherwise, prctl or not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:  # no prctl here: EOF from the server still stops us later
        log.warning("%s: cannot ask to be stopped with the server (prctl: %s)", who, exc)
    if parent_pid is not None and os.getppid() != parent_pid:
        log.error("%s: the server (pid %d) is gone already; exiting", who, parent_pid)
        return False
    return True
