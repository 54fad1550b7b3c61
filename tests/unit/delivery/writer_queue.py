"""The SQLite store with its enqueue writer process delivering local mail, as
the server runs it: shared by test_local_at_enqueue and test_local_direct."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gannet.clock import SystemClock
from gannet.config import DeliveryConfig
from gannet.delivery.local import LocalDelivery
from gannet.delivery.local_at_enqueue import Settings
from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, RecipientState, Transport
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_enqueue_process import EnqueueProcess

from .relay_helpers import until

LEASE = 600.0  # longer than any test: only a release, never an expiry, frees a recipient


def local(address: str, **kwargs: object) -> NewRecipient:
    return NewRecipient(address, Transport.LOCAL, address.rpartition("@")[2], mailbox=address, **kwargs)


def message(*rcpts: NewRecipient, body: bytes | None = None, held: bool = False) -> NewMessage:
    qid = new_queue_id()
    data = body if body is not None else f"Message-ID: <{qid}@test>\r\n\r\nhello\r\n".encode()
    return NewMessage(qid, "a@remote.test", rcpts, InlineBody(data), time.time(), held=held)


def half_writable(root: Path) -> NewMessage:
    """A message for three local recipients of which only ok@ can be written
    under the Maildir root `root`: blocked@ finds a file where its Maildir
    should be, and ../evil@ is no path."""
    blocked = root / "example.test" / "blocked"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory")
    return message(local("blocked@example.test"), local("../evil@example.test"), local("ok@example.test"))


class Queue:
    """A server's SQLite store with its enqueue writer delivering local mail
    (`direct`: all-local messages before the reply, delivery/local_direct.py)."""

    def __init__(self, tmp_path: Path, *, direct: bool = False) -> None:
        self.root = tmp_path / "mail"
        self.template = str(self.root / "{domain}" / "{user}")
        (tmp_path / "spool").mkdir(exist_ok=True)
        self.spool = tmp_path / "spool"
        self.store = SqliteStore(
            tmp_path / "queue.db",
            spool_dir=self.spool,
            enqueue_process=True,
            release_leases_on_open=False,
            local_delivery=Settings(self.template, LEASE, direct=direct).to_json(),
        )
        self.released = 0

    async def open(self) -> None:
        await self.store.open()
        assert self.enqueuer.ready, "the enqueue writer process did not start"
        self.enqueuer.on_released = self._on_released

    def _on_released(self) -> None:
        self.released += 1

    @property
    def enqueuer(self) -> EnqueueProcess:
        enqueuer = self.store.enqueue_process
        assert enqueuer is not None
        return enqueuer

    def files(self, mailbox: str) -> list[Path]:
        user, _, domain = mailbox.partition("@")
        new = self.root / domain / user / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    async def states(self, qid: str) -> dict[str, RecipientState]:
        views = {v.queue_id: v for v in await self.store.list_messages()}
        return {r.address: r.state for r in views[qid].recipients} if qid in views else {}

    async def empty(self) -> bool:
        return not await self.store.list_messages()

    async def drain(self, what: str, seconds: float = 10.0) -> None:
        """Run the delivery loop, as the delivery worker runs it, until the queue is empty."""
        loop = LocalDelivery(
            self.store, maildir_template=self.template, delivery=DeliveryConfig(), clock=SystemClock(),
            batch_sync=True, lease_seconds=LEASE,
        )  # fmt: skip
        task = asyncio.create_task(loop.run())
        try:
            await until(self.empty, what, seconds)
        finally:
            await loop.stop()
            await task

    async def state_is(self, qid: str, address: str, state: RecipientState | None) -> bool:
        return (await self.states(qid)).get(address) == state


@asynccontextmanager
async def running(tmp_path: Path, *, direct: bool = False) -> AsyncIterator[Queue]:
    queue = Queue(tmp_path, direct=direct)
    await queue.open()
    try:
        yield queue
    finally:
        await queue.store.close()
