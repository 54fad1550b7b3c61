"""`gannet queue list|show|retry|hold|release|delete` (CONTRACT.md).

Owns what the commands do: which messages a selection names (queue IDs, `-`
for IDs on standard input, filters, `--all`), progress on stderr for long
work, the error messages (each says what to do next) and the exit codes.
Talks to the queue only through QueueStore, opened with recover=False (crash
recovery is the server's). Rendering is tables.py's. Never imported by the
server or the delivery worker.

A long selection is worked through in pages (PAGE messages per store call,
keyset-paged), so that the store's single writer, which the SMTP sessions
share, is never held for long by an operator's command.

Exit codes: 0 done; 1 a message named on the command line is not in the
queue; 2 bad usage or config; 74 (EX_IOERR) the queue cannot be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from gannet.admin import tables
from gannet.admin.progress import Progress
from gannet.config import Config
from gannet.queue.model import NoSuchMessage, QueuedMessageView, QueueError, QueueFilter, RecipientState
from gannet.queue.store import QueueStore

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_IOERR = 0, 1, 2, 74
PAGE = 500  # messages per store call
CHUNK = 200  # actions submitted together (the store commits them in one batch)
LIST_STATES = ("queued", "deferred", "held", "delivering", "delivered", "failed", "quarantined")


class QueueUnavailable(Exception):
    """The queue cannot be opened; the message says which file, why, and what to do."""


class UsageError(Exception):
    pass


# --- argparse (cli.py calls these) -------------------------------------------------


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sender", help="envelope sender (exact, case-insensitive; '<>' for bounces)")
    p.add_argument("--recipient", help="a recipient's address (exact, case-insensitive)")
    p.add_argument("--domain", help="a recipient's domain")
    p.add_argument("--state", choices=LIST_STATES, help="a recipient in this state")
    p.add_argument("--older-than", metavar="AGE", help="received more than AGE ago (30s, 5m, 4h, 5d)")
    p.add_argument("--newer-than", metavar="AGE", help="received less than AGE ago")


def main(args: argparse.Namespace, config: Config) -> int:
    """Run `gannet queue ACTION` (args.action) against the config's queue."""
    try:
        if args.action == "list":
            return run_with_queue(config, lambda store: list_messages(store, args))
        if args.action == "show":
            return run_with_queue(config, lambda store: show_message(store, args))
        return run_with_queue(config, lambda store: act(store, args, config))
    except UsageError as exc:
        print(f"gannet queue {args.action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QueueUnavailable as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_IOERR


# --- opening the queue ----------------------------------------------------------------


def run_with_queue(config: Config, work: Callable[[QueueStore], Awaitable[int]]) -> int:
    async def go() -> int:
        async with open_queue(config) as store:
            return await work(store)

    return asyncio.run(go())


@contextlib.asynccontextmanager
async def open_queue(config: Config) -> AsyncIterator[QueueStore]:
    """The config's queue, opened for an operator's command, or QueueUnavailable."""
    from gannet.queue.sqlite import SqliteStore

    path = config.queue.sqlite_path
    if path is None:  # a shared PostgreSQL queue: what this node's tools see, every node sees
        from gannet.queue.configured import Opener, make_store

        shared = make_store(config.queue, config.data_dir, Opener.TOOL)
        try:
            await shared.open()
        except QueueError as exc:
            raise QueueUnavailable(f"cannot open the queue: {exc}") from exc
        try:
            yield shared
        finally:
            await shared.close()
        return
    if not path.exists():
        raise QueueUnavailable(
            f"no queue at {path}: Gannet has not run with {config.file} yet (data_dir and [queue] url "
            f"decide where it is). Start it with `gannet serve --config {config.file}`, or give the "
            "config it runs with (--config or $GANNET_CONFIG)."
        )
    _become_queue_owner(path)
    for p in (path, path.parent):
        if not os.access(p, os.R_OK | os.W_OK):
            raise QueueUnavailable(
                f"cannot open the queue {path}: permission denied on {p} (owner uid {p.stat().st_uid}). "
                "Run this as the user Gannet runs as (e.g. `sudo -u gannet gannet queue …`) or as root."
            )
    store = SqliteStore(path, spool_dir=config.data_dir / "spool", recover=False)
    try:
        await store.open()
    except (QueueError, OSError, ValueError) as exc:
        raise QueueUnavailable(f"cannot open the queue {path}: {exc}") from exc
    except Exception as exc:  # sqlite3.Error and friends: say which file, not a traceback
        raise QueueUnavailable(f"cannot open the queue {path}: {type(exc).__name__}: {exc}") from exc
    try:
        yield store
    finally:
        await store.close()


def _become_queue_owner(path: Path) -> None:
    """Root acts as the queue's owner, so that the files SQLite creates beside the
    database (-wal, -shm, the writer lock) stay usable by the server's user."""
    if os.geteuid() != 0:
        return
    st = path.stat()
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def wake_delivery(config: Config) -> str:
    """Tell a running delivery worker to look at the queue now (SIGUSR1). Returns
    what happened, for the user: the worker otherwise looks within 30 s."""
    lock = config.data_dir / "delivery.lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return "Gannet is not running: the mail goes out when it starts"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = int(os.pread(fd, 32, 0).strip() or 0)  # locked: the PID in it is the live worker's
            if pid > 0:
                os.kill(pid, signal.SIGUSR1)
                return "the delivery worker was told to start now"
            return "the delivery worker will see it within 30s"
        return "Gannet is not running: the mail goes out when it starts"
    except (OSError, ValueError):
        return "the delivery worker will see it within 30s"
    finally:
        os.close(fd)


# --- selection ---------------------------------------------------------------------------

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, option: str) -> float:
    m = _AGE.fullmatch(text)
    if not m:
        raise UsageError(f"{option} takes an age: a number and a unit, like 30s, 5m, 4h, 5d (got {text!r})")
    return float(m.group(1)) * _UNITS[m.group(2)]


def queue_filter(args: argparse.Namespace, now: float) -> QueueFilter | None:
    """The filter the options describe, or None when none was given."""
    state = getattr(args, "state", None)
    f = QueueFilter(
        sender=None if args.sender is None else args.sender.strip().strip("<>"),  # "<>": the null sender
        recipient=None if args.recipient is None else args.recipient.strip("<>"),
        domain=args.domain,
        state=RecipientState(state) if state not in (None, "held", "quarantined") else None,
        # A held message's recipients are shown as "held", never as their stored state.
        held=True if state == "held" else (False if state not in (None, "quarantined") else None),
        quarantined=True if state == "quarantined" else None,
        older_than=None if args.older_than is None else now - parse_age(args.older_than, "--older-than"),
        newer_than=None if args.newer_than is None else now - parse_age(args.newer_than, "--newer-than"),
    )
    return None if f == QueueFilter() else f


async def pages(
    store: QueueStore, f: QueueFilter | None, limit: int | None = None
) -> AsyncIterator[list[QueuedMessageView]]:
    """The matching messages, oldest first, PAGE at a time."""
    base = f or QueueFilter()
    seen = 0
    after: tuple[float, str] | None = None
    while limit is None or seen < limit:
        size = PAGE if limit is None else min(PAGE, limit - seen)
        page = await store.list_messages(_with(base, limit=size, after=after))
        if not page:
            return
        seen += len(page)
        yield page
        if len(page) < size:
            return
        after = (page[-1].received_at, page[-1].queue_id)


def _with(f: QueueFilter, **changes: object) -> QueueFilter:
    from dataclasses import replace

    return replace(f, **changes)  # type: ignore[arg-type]


def _ids_from(args: argparse.Namespace) -> list[str]:
    ids: list[str] = []
    for item in args.ids:
        if item == "-":
            ids += [line.strip() for line in sys.stdin if line.strip() and not line.startswith("#")]
        else:
            ids.append(item.strip())
    return list(dict.fromkeys(ids))


# --- list and show -------------------------------------------------------------------------


async def list_messages(store: QueueStore, args: argparse.Namespace) -> int:
    now = time.time()
    f = queue_filter(args, now)
    views: list[QueuedMessageView] = []
    with Progress("reading the queue", None) as progress:
        async for page in pages(store, f, args.limit):
            views += page
            progress.advance(len(page))
    if args.json:
        print(json.dumps([tables.message_json(v) for v in views], indent=1))
        return EXIT_OK
    out = tables.Output()
    if not views:
        out.line("no message matches those filters" if f else "the queue is empty")
        return EXIT_OK
    out.table(tables.queue_table(views, now))
    more = " (--limit reached)" if args.limit is not None and len(views) >= args.limit else ""
    out.line(f"-- {tables.queue_summary(views)}{more}")
    return EXIT_OK


async def show_message(store: QueueStore, args: argparse.Namespace) -> int:
    try:
        view = await store.get_message(args.id)
        body = await store.read_body(args.id)
    except NoSuchMessage:
        print(await _not_in_queue(store, args.id), file=sys.stderr)
        return EXIT_NO
    except QueueError as exc:  # e.g. a quarantined message whose body is gone: show the rest
        view = await store.get_message(args.id)
        body = f"(the body cannot be read: {exc})".encode()
    head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    if args.json:
        print(json.dumps({**tables.message_json(view, detail=True), "headers": head}, indent=1))
        return EXIT_OK
    out = tables.Output()
    lines, recipients, history = tables.message_lines(view, head, time.time())
    for line in lines[: lines.index("headers:")]:
        out.line(line)
    out.table(recipients)
    out.table(history)
    for line in lines[lines.index("headers:") :]:
        out.line(line)
    return EXIT_OK


async def _not_in_queue(store: QueueStore, queue_id: str) -> str:
    """The error for an ID that is not in the queue, with where to look next."""
    events = await store.trace(queue_id)
    if events and events[-1].event in ("completed", "deleted"):
        return (
            f"gannet: {queue_id} is no longer in the queue ({events[-1].event} at "
            f"{tables.clock_time(events[-1].at)} UTC); `gannet trace {queue_id}` shows what happened"
        )
    return (
        f"gannet: no message {queue_id} in the queue; `gannet queue list` shows what is queued, "
        f"`gannet trace {queue_id}` what became of a recent one"
    )


# --- retry, hold, release, delete ---------------------------------------------------------


async def act(store: QueueStore, args: argparse.Namespace, config: Config) -> int:
    action: str = args.action
    now = time.time()
    ids = _ids_from(args)
    f = queue_filter(args, now)
    if not ids and f is None and not args.all:
        raise UsageError(
            "give queue IDs, `-` to read them from standard input, filters (--sender, "
            "--domain, --state …) or --all; `gannet queue list` shows the IDs"
        )
    if ids and (f is not None or args.all):
        raise UsageError("give either queue IDs or a selection (filters, --all), not both")
    named = bool(ids)
    if not named:
        if action == "retry" and f is None:
            f = QueueFilter(state=RecipientState.DEFERRED)  # only those have anything to retry
        with Progress("finding the messages", None) as progress:
            async for page in pages(store, f):
                ids += [v.queue_id for v in page]
                progress.advance(len(page))
    done: list[str] = []
    missing: list[str] = []
    touched = 0
    with Progress(f"{action}: messages", len(ids)) as progress:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            results = await asyncio.gather(
                *(_apply(store, action, qid, now) for qid in chunk), return_exceptions=True
            )
            for qid, result in zip(chunk, results, strict=True):
                if isinstance(result, NoSuchMessage):
                    missing.append(qid)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    done.append(qid)
                    touched += result
            progress.advance(len(chunk))
    woke = wake_delivery(config) if action in ("retry", "release") and done else ""
    if args.json:
        report: dict[str, object] = {"action": action, "done": done, "missing": missing}
        if action == "retry":
            report["recipients"] = touched
        print(json.dumps(report, indent=1))
    else:
        _report(action, done, touched, woke)
    for qid in missing if named else ():
        print(await _not_in_queue(store, qid), file=sys.stderr)
    return EXIT_NO if named and missing else EXIT_OK


async def _apply(store: QueueStore, action: str, queue_id: str, now: float) -> int:
    if action == "retry":
        return await store.retry(queue_id, now)
    await getattr(store, action)(queue_id, now)
    return 0


PAST = {"retry": "retried", "hold": "held", "release": "released", "delete": "deleted"}


def _report(action: str, done: list[str], touched: int, woke: str) -> None:
    if len(done) <= 20:
        for qid in done:
            print(f"{qid}: {PAST[action]}")
    if action == "retry":
        line = f"{len(done)} message(s), {touched} recipient(s) due now"
    else:
        line = f"{PAST[action]} {len(done)} message(s)"
    print(line + (f"; {woke}" if woke else ""))
