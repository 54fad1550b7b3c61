"""`gannet serve`: wires config, queue store, delivery and listeners, and runs them.

Start-up order: store (open/recover) → policy tables → TLS → delivery loop →
listeners; nothing listens before everything it needs is ready. Signals:
SIGTERM/SIGINT stop listening, let sessions finish (bounded), stop delivery,
close the store, exit 0. SIGHUP re-reads the config; a bad new config is
refused, logged, and the old one kept; `[[listen]]` and `[admin]` changes
are applied too (Listeners.apply, `_reload_admin`).

The users file is re-read when it changes (checked when a session starts),
so `gannet users add` takes effect without a reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import resource
import signal
import sys
import time
from typing import TYPE_CHECKING

from gannet import config as config_mod
from gannet import metrics
from gannet.clock import SystemClock
from gannet.config import Config, ConfigError
from gannet.delivery import local_at_enqueue
from gannet.mailauth import checker as mailauth_checker
from gannet.mailauth.signing import Signer
from gannet.policy.accounts import AccountsError, AccountsFile
from gannet.policy.recipients import RecipientTable
from gannet.queue.configured import Opener, make_store
from gannet.queue.model import QueueError
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_enqueue_process import EnqueueProcess
from gannet.queue.store import QueueStore
from gannet.server.auth import PasswordVerifier
from gannet.server.listener import Listeners
from gannet.server.services import Services
from gannet.server.tls import server_context

if TYPE_CHECKING:
    from gannet.admin.http import AdminServer

log = logging.getLogger("gannet")

SHUTDOWN_GRACE = 30.0


def open_store(config: Config, log_format: str = "text") -> QueueStore:
    """SQLite or PostgreSQL per `[queue] url`, opened as the server: crash recovery,
    schema migration (PostgreSQL: under an advisory lock, so nodes that start
    together take turns); leases are left to the delivery worker."""
    local_delivery = _local_delivery(config, log_format)
    return make_store(config.queue, config.data_dir, Opener.SERVER, local_delivery=local_delivery)


def _local_delivery(config: Config, log_format: str) -> str:
    """The enqueue writer's local delivery settings (JSON), or "" (delivery/local_at_enqueue.py)."""
    settings = local_at_enqueue.settings_for(config, log_format)
    return settings.to_json() if settings is not None else ""


class Server:
    """One running Gannet. `await run()` until stopped."""

    def __init__(self, config: Config, log_format: str = "text") -> None:
        self.config = config
        self.log_format = log_format
        self.clock = SystemClock()
        self.accounts = AccountsFile(config.mailboxes.users_file)
        self.stopping = asyncio.Event()
        self.admin: AdminServer | None = None
        self._reloading: asyncio.Task[None] | None = None

    def _table(self, config: Config) -> RecipientTable:
        return RecipientTable.from_config(config.relay, config.mailboxes, self.accounts.get())

    async def run(self) -> int:
        config = self.config
        _raise_open_files_limit(config.smtp.max_sessions)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        (config.data_dir / "spool").mkdir(exist_ok=True)
        # Before the delivery worker starts: it inherits the metrics directory (gannet/metrics.py).
        try:
            metrics.start_server_process(
                config.data_dir / "metrics", (*config.relay.local_domains, *config.relay.relay_domains)
            )
        except metrics.DirectoryBusy as exc:
            raise ConfigError(config.file, "data_dir", str(exc)) from None
        store = open_store(config, self.log_format)
        try:
            await store.open()
        except QueueError as exc:  # the database is unreachable, or newer than this Gannet
            log.error("cannot open the queue: %s", exc)
            return 1
        try:
            return await self._run_with_store(store)
        finally:
            stats = getattr(store, "stats", None)  # SqliteStore and PostgresStore writer counters
            if stats is not None:
                log.info("server queue writer: %s", stats.summary())
            await store.close()

    async def _run_with_store(self, store: QueueStore) -> int:
        config = self.config
        tls = server_context(config.tls, config.file)
        delivery = DeliveryWorker(config, self.log_format)
        self.delivery = delivery
        enqueuer = _writer_process(store)
        if enqueuer is not None:  # it gave local mail back: the delivery loop takes it
            enqueuer.on_released = delivery.wake
        services = Services(
            config=config,
            store=store,
            recipients=self._table(config),
            verifier=PasswordVerifier(self.accounts.get),
            tls_context=tls,
            clock=self.clock,
            on_enqueued=delivery.wake,
            mailauth=mailauth_checker.from_config(config, self.clock),
            signer=Signer.from_config(config),  # ConfigError (unreadable key) → exit 2
        )
        services.refresh_recipients = self._current_table
        self.services = services
        listeners = Listeners(services)
        self.store = store
        if config.admin.address:  # first: a port in use ends the start before a worker is spawned
            self.admin = self._admin_server(config)
            await self.admin.start()
        await delivery.start()
        await listeners.start()
        self.listeners = listeners
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("gannet ready: %s, queue %s", config.hostname, config.queue.url)
        await self.stopping.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        if self._reloading is not None:  # let it finish: it may be binding listeners
            await asyncio.gather(self._reloading, return_exceptions=True)
        log.info("stopping: no new connections; letting sessions finish (up to %.0fs)", SHUTDOWN_GRACE)
        await listeners.stop(SHUTDOWN_GRACE)
        await delivery.stop(SHUTDOWN_GRACE)
        if services.mailauth is not None:
            await services.mailauth.close()
        if self.admin is not None:
            await self.admin.stop()
        log.info("stopped")
        return 0

    def _current_table(self) -> RecipientTable:
        """Called as each session starts: the table, rebuilt if the users file changed."""
        table = self.services.recipients
        accounts = self.accounts.get()
        if table.accounts is not accounts:
            table = RecipientTable.from_config(self.config.relay, self.config.mailboxes, accounts)
        return table

    def _admin_server(self, config: Config) -> AdminServer:
        from gannet.admin.http import AdminServer  # prometheus_client: only after metrics set it up

        return AdminServer(
            config.admin,
            self.store,
            self.clock,
            wake_delivery=self.delivery.wake,
            hostname=config.hostname,
            config_file=config.file,
        )

    def reload(self) -> None:
        """SIGHUP. One reload at a time: a second waits for the first."""
        previous = self._reloading
        self._reloading = asyncio.get_running_loop().create_task(self._reload(previous))

    async def _reload(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            await self._reload_config()
        except Exception:  # a bug: logged here, not lost in a task nobody awaits
            log.exception("reload failed part-way; restart to be sure of the config in force")

    async def _reload_config(self) -> None:
        try:
            new = config_mod.load(self.config.file)
            tls = server_context(new.tls, new.file)
            table = self._table(new)
            signer = Signer.from_config(new)
        except (ConfigError, AccountsError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        if new.listen != self.config.listen:  # first: the one step that can still fail
            running_tls, self.services.tls_context = self.services.tls_context, tls  # for new 465s
            try:
                await self.listeners.apply(new.listen)
            except OSError as exc:
                self.services.tls_context = running_tls
                log.error("reload refused, keeping the running config: [[listen]]: %s", exc)
                return
        changed = _changed_sections(self.config, new)
        self.services.signer = signer
        if {"mailauth", "dns", "hostname"} & set(changed):  # else keep the checks' DNS cache
            old = self.services.mailauth
            self.services.mailauth = mailauth_checker.from_config(new, self.clock)
            if old is not None:  # sessions still in the old checks fall back to checking in the server
                self._closing_checks = asyncio.get_running_loop().create_task(old.close())
        running_admin = self.admin.config if self.admin is not None else None
        if (new.admin if new.admin.address else None) != running_admin:  # (after a failed try too)
            await self._reload_admin(new)
        self.config = new
        self.services.config = new
        self.services.recipients = table
        self.services.tls_context = tls
        log.info("reloaded %s; changed: %s", new.file, ", ".join(changed) or "nothing")
        if {"mailboxes", "delivery", "queue", "hostname"} & set(changed):
            self.delivery.config = new
            self._restart = asyncio.get_running_loop().create_task(self.delivery.restart(SHUTDOWN_GRACE))
        enqueuer = _writer_process(self.store)
        local_delivery = _local_delivery(new, self.log_format)
        if enqueuer is not None and enqueuer.local_delivery != local_delivery:
            # A Maildir template, the lease, on or off. Awaited here, so that a
            # stop waits for it (run() awaits the reload) and never races it.
            enqueuer.local_delivery = local_delivery
            await enqueuer.restart()

    async def _reload_admin(self, new: Config) -> None:
        """[admin] changed: its server again, with the new settings. On a new
        address the new one is started before the old one stops, so that a
        failure (logged) leaves the old one serving."""
        old = self.admin
        if old is not None and old.config.address == new.admin.address:
            await old.stop()  # the same port: it must be free first
            old = self.admin = None
        fresh = self._admin_server(new) if new.admin.address else None
        if fresh is not None:
            try:
                await fresh.start()
            except (ConfigError, OSError) as exc:  # the port is taken; the token file went
                then = "the admin server keeps running as it was" if old else "no admin server until fixed"
                log.error("reload: %s; %s", exc, then)
                return
        if old is not None:
            await old.stop()
        self.admin = fresh


def _raise_open_files_limit(sessions: int) -> None:
    """Each session is a socket: lift the soft fd limit toward the hard one so that
    `smtp.max_sessions` can actually be reached (the default soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = sessions + 256 if hard == resource.RLIM_INFINITY else min(hard, sessions + 256)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.info("open files limit raised from %d to %d", soft, want)
    if hard != resource.RLIM_INFINITY and hard < sessions:
        log.warning("the hard open files limit (%d) is below smtp.max_sessions (%d)", hard, sessions)


class DeliveryWorker:
    """The local delivery worker process (gannet/delivery/worker.py): start it,
    wake it after each enqueue, restart it if it dies, stop it gracefully."""

    RESTART_DELAY = 1.0  # the first restart's wait; doubled while the worker keeps dying young
    RESTART_DELAY_MAX = 60.0
    HEALTHY_AFTER = 60.0  # a worker that ran this long resets the delay

    def __init__(self, config: Config, log_format: str = "text") -> None:
        self.config = config
        self.log_format = log_format
        self.proc: asyncio.subprocess.Process | None = None
        self._wake_w = -1
        self._wake_pending = False
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-supervisor")

    async def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            # The worker gets the config this process validated (pickled on its
            # stdin), not the file, which may have changed since.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gannet",
                "deliver-worker",
                "--wake-fd",
                str(read_fd),
                "--log-format",
                self.log_format,
                "--parent-pid",
                str(os.getpid()),
                pass_fds=(read_fd,),
                stdin=asyncio.subprocess.PIPE,
            )
            assert self.proc.stdin is not None
            self.proc.stdin.write(pickle.dumps(self.config))
            self.proc.stdin.close()
        finally:
            os.close(read_fd)
        if self._wake_w >= 0:
            os.close(self._wake_w)
        self._wake_w = write_fd
        self.wake()  # mail may have been queued while no worker ran
        log.info("delivery worker started (pid %d)", self.proc.pid)

    async def _supervise(self) -> None:
        delay = self.RESTART_DELAY
        while not self._stopping:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started >= self.HEALTHY_AFTER:
                delay = self.RESTART_DELAY
            # A worker that dies at once (a data directory gone, a broken disk)
            # must not become a restart loop that burns a core: back off.
            log.error(
                "delivery worker (pid %d) exited with status %s; restarting in %.0fs",
                self.proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RESTART_DELAY_MAX)
            if not self._stopping:
                await self._spawn()

    def wake(self) -> None:
        """Coalesced: one byte per event-loop turn however many messages were queued."""
        if not self._wake_pending and self._wake_w >= 0:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_pending = False
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, BrokenPipeError):
            pass  # a full pipe already holds a wake-up; a broken one: the supervisor restarts it

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.error("delivery worker did not stop within %.0fs; killing it", grace)
                proc.kill()
                await proc.wait()
        if self._wake_w >= 0:
            os.close(self._wake_w)
            self._wake_w = -1

    async def restart(self, grace: float) -> None:
        await self.stop(grace)
        await self.start()


def _changed_sections(old: Config, new: Config) -> list[str]:
    names = [
        "hostname",
        "listen",
        "queue",
        "tls",
        "relay",
        "mailboxes",
        "delivery",
        "dns",
        "dkim",
        "mailauth",
        "admin",
        "smtp",
    ]
    return [n for n in names if getattr(old, n) != getattr(new, n)]


def _writer_process(store: QueueStore) -> EnqueueProcess | None:
    """The SQLite store's enqueue writer process, when it runs one (a PostgreSQL store has none)."""
    return store.enqueue_process if isinstance(store, SqliteStore) else None
