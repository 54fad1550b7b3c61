"""`gannet serve`: wires config, queue store, delivery and listeners, and runs them.

Start-up order: store (open/recover) → policy tables → TLS → delivery loop →
listeners; nothing listens before everything it needs is ready. Signals:
SIGTERM/SIGINT stop listening, let sessions finish (bounded), stop delivery,
close the store, exit 0. SIGHUP re-reads the config; a bad new config is
refused, logged, and the old one kept.

The users file is re-read when it changes (checked when a session starts),
so `gannet users add` takes effect without a reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from gannet import config as config_mod
from gannet.clock import SystemClock
from gannet.config import Config, ConfigError
from gannet.delivery.local import LocalDelivery
from gannet.policy.accounts import Accounts, AccountsError
from gannet.policy.recipients import RecipientTable
from gannet.queue.sqlite import SqliteStore
from gannet.queue.store import QueueStore
from gannet.server.auth import PasswordVerifier
from gannet.server.listener import Listeners
from gannet.server.services import Services
from gannet.server.tls import server_context

log = logging.getLogger("gannet")

SHUTDOWN_GRACE = 30.0


def open_store(config: Config) -> QueueStore:
    if config.queue.sqlite_path is None:
        raise ConfigError(
            config.file, "queue.url", "the PostgreSQL store is not available in this version", '"sqlite:"'
        )
    return SqliteStore(config.queue.sqlite_path, spool_dir=config.data_dir / "spool")


@dataclass(slots=True)
class _AccountsCache:
    """The users file, re-read when its mtime or size changes."""

    path: Path
    stamp: tuple[int, int] = (-1, -1)
    accounts: Accounts | None = None

    def get(self) -> Accounts:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self.stamp or self.accounts is None:
            try:
                self.accounts = Accounts.load(self.path)
                self.stamp = stamp
            except AccountsError as exc:
                if self.accounts is None:
                    raise
                log.error("users file not reloaded, keeping the previous one: %s", exc)
        return self.accounts


class Server:
    """One running Gannet. `await run()` until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock = SystemClock()
        self.accounts = _AccountsCache(config.mailboxes.users_file)
        self.stopping = asyncio.Event()

    def _table(self, config: Config) -> RecipientTable:
        return RecipientTable.from_config(config.relay, config.mailboxes, self.accounts.get())

    async def run(self) -> int:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        (config.data_dir / "spool").mkdir(exist_ok=True)
        store = open_store(config)
        await store.open()
        try:
            return await self._run_with_store(store)
        finally:
            await store.close()

    async def _run_with_store(self, store: QueueStore) -> int:
        config = self.config
        tls = server_context(config.tls, config.file)
        delivery = LocalDelivery(
            store, maildir_template=config.mailboxes.maildir, delivery=config.delivery, clock=self.clock
        )
        services = Services(
            config=config,
            store=store,
            recipients=self._table(config),
            verifier=PasswordVerifier(self.accounts.get),
            tls_context=tls,
            clock=self.clock,
            on_enqueued=delivery.wake,
        )
        services.refresh_recipients = self._current_table
        self.services = services
        listeners = Listeners(services)
        delivery_task = asyncio.create_task(delivery.run(), name="local-delivery")
        await listeners.start()
        self.listeners = listeners
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("gannet ready: %s, queue %s", config.hostname, config.queue.url)
        await self.stopping.wait()
        log.info("stopping: no new connections; letting sessions finish (up to %.0fs)", SHUTDOWN_GRACE)
        services.shutting_down = True
        await listeners.stop(SHUTDOWN_GRACE)
        await delivery.stop()
        delivery_task.cancel()
        await asyncio.gather(delivery_task, return_exceptions=True)
        log.info("stopped")
        return 0

    def _current_table(self) -> RecipientTable:
        """Called as each session starts: the table, rebuilt if the users file changed."""
        table = self.services.recipients
        accounts = self.accounts.get()
        if table.accounts is not accounts:
            table = RecipientTable.from_config(self.config.relay, self.config.mailboxes, accounts)
        return table

    def reload(self) -> None:
        try:
            new = config_mod.load(self.config.file)
            tls = server_context(new.tls, new.file)
            table = self._table(new)
        except (ConfigError, AccountsError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        changed = _changed_sections(self.config, new)
        if new.listen != self.config.listen:
            log.warning("reload: [[listen]] changes take effect only after a restart")
        self.config = new
        self.services.config = new
        self.services.recipients = table
        self.services.tls_context = tls
        log.info("reloaded %s; changed: %s", new.file, ", ".join(changed) or "nothing")


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
