"""The delivery worker: every delivery agent (local Maildir or LMTP, outbound
SMTP, the queue sweep; see agents.py) in a process of its own, started by
`gannet serve`.

Why a process and not threads beside the SMTP sessions: Maildir delivery is
fsync- and syscall-heavy, and in one process its threads fight the event loop
for the GIL (measured: 2.5 ms of CPU per message with both in one process,
against ~1.0 ms accepting plus ~0.5 ms delivering apart). In its own process
it has its own GIL, event loop and SQLite connection, and uses the machine's
second core, as Postfix's qmgr and local(8) do beside smtpd.

Protocol with the parent (runtime.DeliveryWorker):
- the parent opens the store first (crash recovery, lease release), then
  starts this process with the read end of a pipe, and writes the Config it
  validated (pickled) to its stdin: the file may have changed since, and a
  worker must never run on a config its server refused;
- a byte on the pipe means "new mail was queued: look now"; between wakes
  the worker sleeps until the next due recipient (LocalDelivery does that);
- end-of-file on the pipe means the parent is gone: stop (finish the writes
  in flight, record them, exit), so no worker outlives its server;
- SIGTERM: the same graceful stop. A config reload restarts the worker.
  The kernel sends it too when the server dies, even before the pipe is
  watched (gannet/util/parent_watch.py: a worker waiting for the lock below);
- a graceful stop is bounded (STOP_GRACE, inside the server's own 30 s):
  deliveries still hanging then are abandoned, their leases left to expire
  or to the next worker's release — a server that is gone cannot kill us.
- SIGUSR1: flush: forget dead destinations and look at the queue now
  (`gannet queue retry/release` send it, so that a flush waits neither for
  the idle timer nor for a destination's backoff); the worker's PID is in
  `data_dir/delivery.lock`, valid while that file is locked.

One worker per data directory: at start it takes an exclusive lock on
`data_dir/delivery.lock` (waiting while a predecessor still finishes its last
writes, e.g. after its server was killed and restarted at once), and only
then releases the leases of its agents' owner names: whoever held them is gone. The
server's own crash recovery leaves leases alone for this reason; releasing
them under a live predecessor would deliver its last messages twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
from pathlib import Path

from gannet import metrics
from gannet.clock import SystemClock
from gannet.config import Config
from gannet.delivery.agents import OWNERS, build_agents
from gannet.queue.configured import Opener, make_store, owner_name

log = logging.getLogger("gannet.delivery")

STOP_GRACE = 25.0  # seconds for the agents to finish what they hold once told to stop


async def run_worker(config: Config, wake_fd: int) -> int:
    if metrics.multiprocess():  # `gannet serve` started us and reads our counts (gannet/metrics.py)
        metrics.configure((*config.relay.local_domains, *config.relay.relay_domains))
    lock = await _take_worker_lock(config.data_dir / "delivery.lock")
    store = make_store(config.queue, config.data_dir, Opener.WORKER)
    await store.open()
    try:
        # This node's owner names only ("NODE/agent" on a shared queue): other
        # nodes' leases are alive, and theirs to release.
        for owner in (owner_name(config.queue, agent) for agent in OWNERS):
            released = await store.release_leases(owner)
            if released:
                log.info(
                    "delivery worker: %d recipient(s) left claimed by a previous %s worker are due again",
                    released,
                    owner,
                )
        agents = build_agents(config, store, SystemClock())
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        os.set_blocking(wake_fd, False)

        def on_wake() -> None:
            try:
                data = os.read(wake_fd, 65536)
            except BlockingIOError:
                return
            if data:
                agents.wake()
            else:  # the parent closed its end: it is gone
                loop.remove_reader(wake_fd)
                stopping.set()

        loop.add_reader(wake_fd, on_wake)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, agents.flush)
        tasks = [
            asyncio.create_task(agents.local.run(), name="local-delivery"),
            asyncio.create_task(agents.remote.run(), name="remote-delivery"),
            asyncio.create_task(agents.sweep.run(), name="queue-sweep"),
        ]
        await stopping.wait()
        agents.sweep.stop()
        try:
            await asyncio.wait_for(asyncio.gather(agents.local.stop(), agents.remote.stop()), STOP_GRACE)
        except TimeoutError:
            log.warning(
                "delivery worker: deliveries still running after %.0fs are abandoned; "
                "their leases expire, or the next worker releases them",
                STOP_GRACE,
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return 0
    finally:
        stats = getattr(store, "stats", None)  # SqliteStore and PostgresStore writer counters
        if stats is not None:
            log.info("delivery worker queue writer: %s", stats.summary())
        await store.close()
        os.close(lock)  # releases the flock


async def _take_worker_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("delivery worker: waiting for the previous worker to finish (%s)", path)
        await asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for `gannet queue` to wake us (SIGUSR1)
    return fd
