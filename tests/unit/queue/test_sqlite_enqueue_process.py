"""The SQLite store's enqueue writer process (sqlite_enqueue_process and
sqlite_enqueue_child): enqueues really run there, commit in groups, survive
the child's SIGKILL at any point without losing or doubling a message, and
the child never outlives its server. The store's shared behaviour with the
process is in tests/contract/ (backend "sqlite-process")."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlite_writer_gate import occupy_writer

import gannet
from gannet.config_model import QueueConfig
from gannet.queue.configured import Opener, make_store
from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, QueueError, SpooledBody, Transport
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_enqueue_process import EnqueueProcess

RCPT = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)


def message(body: bytes = b"x" * 4096) -> NewMessage:
    return NewMessage(new_queue_id(), "a@a.test", RCPT, InlineBody(body), 1.0)


def spooled(spool_dir: Path, size: int = 20_000) -> NewMessage:
    qid = new_queue_id()
    path = spool_dir / f"{qid}.eml"
    path.write_bytes(b"s" * size)
    return NewMessage(qid, "a@a.test", RCPT, SpooledBody(path, size), 1.0)


@pytest.fixture
async def pstore(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", enqueue_process=True)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def child_of(store: SqliteStore) -> EnqueueProcess:
    enqueuer = store.enqueue_process
    assert enqueuer is not None and enqueuer.ready, "the enqueue writer process did not start"
    return enqueuer


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie our asyncio child watcher has not reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def until(condition: object, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.02)


async def test_enqueues_run_in_the_child_and_its_commits_are_counted_here(pstore: SqliteStore) -> None:
    child = child_of(pstore)
    assert child.pid is not None and child.pid != os.getpid() and alive(child.pid)
    spool_dir = pstore.spool_dir
    sent = [message() for _ in range(20)] + [spooled(spool_dir) for _ in range(5)]
    await asyncio.gather(*(pstore.enqueue(m) for m in sent))
    assert child.answered == 25
    assert pstore.stats.jobs >= 25 and pstore.stats.commits >= 1  # the child's counters, merged
    assert pstore.stats.lock_held_seconds > 0  # its commits held the write lock (a float, merged)
    views = {v.queue_id: v for v in await pstore.list_messages()}
    assert set(views) == {m.queue_id for m in sent}
    for m in sent:
        body = m.body.data if isinstance(m.body, InlineBody) else m.body.path.read_bytes()
        assert await pstore.read_body(m.queue_id) == body


async def test_enqueues_that_pile_up_are_committed_together(pstore: SqliteStore) -> None:
    """While the thread holds the write lock (the worker's turn, say), fifty
    sessions' messages gather in the socket and go in one or two COMMITs."""
    child_of(pstore)
    gate, blocker = await occupy_writer(pstore)
    commits = pstore.stats.commits
    waiting = [asyncio.ensure_future(pstore.enqueue(message())) for _ in range(50)]
    await asyncio.sleep(0.5)
    assert not any(w.done() for w in waiting), "answered while another process held the lock"
    gate.set()
    assert await blocker
    await asyncio.gather(*waiting)
    # The child may have read the first few before it blocked on the lock.
    assert pstore.stats.commits - commits <= 3
    assert pstore.stats.max_batch >= 25


async def test_errors_reach_the_caller_alone_as_from_the_thread(pstore: SqliteStore) -> None:
    child_of(pstore)
    good = message()
    duplicate = NewMessage(good.queue_id, "a@a.test", RCPT, InlineBody(b"again"), 1.0)
    no_recipients = NewMessage(new_queue_id(), "a@a.test", (), InlineBody(b"x"), 1.0)
    gone = spooled(pstore.spool_dir)
    gone.body.path.unlink()  # type: ignore[union-attr]
    results = await asyncio.gather(
        pstore.enqueue(good),
        pstore.enqueue(duplicate),
        pstore.enqueue(no_recipients),
        pstore.enqueue(gone),
        pstore.enqueue(message()),
        return_exceptions=True,
    )
    assert results[0] is False and results[4] is False
    assert isinstance(results[1], QueueError) and "duplicate" in str(results[1])
    assert isinstance(results[2], ValueError) and "no recipients" in str(results[2])
    assert isinstance(results[3], QueueError) and not isinstance(results[3], ValueError)
    assert len(await pstore.list_messages()) == 2


@pytest.fixture
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EnqueueProcess, "RESTART_DELAY", 0.05)


async def test_a_sigkilled_child_loses_and_doubles_nothing(quick_restarts: None, pstore: SqliteStore) -> None:
    """Kill -9 the child at random points under load: every enqueue still
    returns (the store looks up what the dead child held and stores what it
    had not), each message is stored once, and a new child takes over."""
    enqueuer = child_of(pstore)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sent: list[NewMessage] = []
    pid = None
    for round_ in range(4):
        # A new child: the killed one's socket may be read after it was reaped.
        await until(lambda: enqueuer.ready and enqueuer.pid != pid, "the restarted child")  # noqa: B023
        pid = enqueuer.pid
        assert pid is not None
        batch = [message() if i % 5 else spooled(pstore.spool_dir) for i in range(150)]
        sent += batch
        tasks = [asyncio.ensure_future(pstore.enqueue(m)) for m in batch]
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"seed {seed}, round {round_}: {errors[:3]}"
        await until(lambda: not alive(pid), f"child {pid} to be reaped")  # noqa: B023
    stored = [v.queue_id for v in await pstore.list_messages()]
    assert sorted(stored) == sorted(m.queue_id for m in sent), f"seed {seed}"
    assert not any(v.quarantined for v in await pstore.list_messages())
    await until(lambda: enqueuer.ready, "the restarted child")
    answered = enqueuer.answered
    await pstore.enqueue(message())
    assert enqueuer.answered == answered + 1, "the new child did not take the enqueues back"


async def test_closing_the_store_stops_the_child_after_its_answers(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", enqueue_process=True)
    await s.open()
    pid = child_of(s).pid
    assert pid is not None
    many = [asyncio.ensure_future(s.enqueue(message())) for _ in range(100)]
    await asyncio.sleep(0)  # the frames are written; close() must not cut them off
    await s.close()
    assert all(t.done() and t.exception() is None for t in many)
    assert not alive(pid)
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await s.open()
    assert len(await s.list_messages()) == 100
    await s.close()


SERVER = r"""
import asyncio, sys
from pathlib import Path
from gannet.queue.sqlite import SqliteStore

async def main(db, spool):
    store = SqliteStore(Path(db), spool_dir=Path(spool), enqueue_process=True)
    await store.open()
    print(store.enqueue_process.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_the_child_dies_with_its_server(tmp_path: Path) -> None:
    """A SIGKILLed server leaves no writer behind (it could commit after the
    next server's crash recovery began)."""
    (tmp_path / "spool").mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(gannet.__file__).resolve().parent.parent))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path / "queue.db"), str(tmp_path / "spool")],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert server.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 30)
        child = int(line)
        assert alive(child)
    finally:
        server.kill()
        server.wait()
    await until(lambda: not alive(child), f"writer {child} to exit with its server", 10)


async def test_without_the_child_the_thread_enqueues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that cannot start (here: no interpreter where it should be)
    leaves the store working on its thread, at once, not after a timeout."""
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", enqueue_process=True)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    await s.open()
    monkeypatch.undo()
    try:
        enqueuer = s.enqueue_process
        assert enqueuer is not None and not enqueuer.ready
        await s.enqueue(message())
        assert enqueuer.answered == 0
        assert len(await s.list_messages()) == 1
    finally:
        await s.close()


async def test_an_answer_that_does_not_decode_kills_the_child_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child (here a stand-in) that says it is ready, then answers with a frame
    that is not marshal data: it is killed, and what it held is settled as after
    a crash (the thread stores the message, once)."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, struct, sys, time\n"
        "fd = int(sys.argv[sys.argv.index('--fd') + 1])\n"
        "import marshal\n"
        "ready = marshal.dumps('ready')\n"
        "os.write(fd, struct.pack('!I', len(ready)) + ready)\n"
        "os.read(fd, 1)  # the first request has come\n"
        "os.write(fd, struct.pack('!I', 3) + b'\\xff\\xff\\xff')\n"
        "time.sleep(60)\n"
    )
    fake.chmod(0o755)
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", enqueue_process=True)
    monkeypatch.setattr(sys, "executable", str(fake))
    await s.open()
    monkeypatch.undo()
    try:
        enqueuer = child_of(s)
        pid = enqueuer.pid
        assert pid is not None
        m = message()
        await asyncio.wait_for(s.enqueue(m), 30)
        assert [v.queue_id for v in await s.list_messages()] == [m.queue_id]
        assert "does not decode; killing it" in caplog.text
        await until(lambda: not alive(pid), "the stand-in child to be gone")
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("opener", "writer_process", "expected"),
    [(Opener.SERVER, True, True), (Opener.SERVER, False, False), (Opener.WORKER, True, False),
     (Opener.TOOL, True, False)],
)  # fmt: skip
async def test_only_the_servers_store_has_the_process_and_the_config_turns_it_off(
    tmp_path: Path, opener: Opener, writer_process: bool, expected: bool
) -> None:
    queue = QueueConfig(sqlite_path=tmp_path / "queue.db", writer_process=writer_process)
    store = make_store(queue, tmp_path, opener)
    await store.open()
    try:
        assert isinstance(store, SqliteStore)
        assert (store.enqueue_process is not None) is expected
    finally:
        await store.close()
