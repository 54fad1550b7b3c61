"""The `gannet` command line (CONTRACT.md). Thin: parse, call a package, map errors to exit codes.

Exit codes: 0 success; 1 the command ran but the answer is "no" (e.g. no such
message); 2 bad usage or bad config (file, key, reason on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gannet import __version__
from gannet import config as config_mod
from gannet.config import Config, ConfigError

EXIT_OK, EXIT_NO, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"gannet: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $GANNET_CONFIG, ./gannet.toml, /etc/gannet/gannet.toml)",
    )
    p = argparse.ArgumentParser(prog="gannet", description="Gannet mail transfer agent", parents=[common])
    p.add_argument("--version", action="version", version=f"gannet {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the server in the foreground")
    s.add_argument("--log-format", choices=("text", "json"), default="text")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("deliver-worker", help="internal: the local delivery process that `serve` starts")
    s.add_argument("--wake-fd", type=int, required=True)
    s.add_argument("--log-format", choices=("text", "json"), default="text")
    s.set_defaults(func=cmd_deliver_worker)

    s = sub.add_parser("check-config", parents=[common], help="validate the config file")
    s.set_defaults(func=cmd_check_config)

    users = sub.add_parser("users", parents=[common], help="submission accounts and mailboxes")
    us = users.add_subparsers(title="users commands", metavar="ACTION")
    u = us.add_parser("add", parents=[common], help="add an account (or change its password)")
    u.add_argument("address")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.set_defaults(func=cmd_users_add)
    u = us.add_parser("list", parents=[common], help="list accounts")
    u.set_defaults(func=cmd_users_list)
    u = us.add_parser("remove", parents=[common], help="remove an account")
    u.add_argument("address")
    u.set_defaults(func=cmd_users_remove)
    users.set_defaults(func=lambda a: _usage(users))

    queue = sub.add_parser("queue", parents=[common], help="inspect and act on the queue")
    qs = queue.add_subparsers(title="queue commands", metavar="ACTION")
    q = qs.add_parser("list", parents=[common], help="one row per queued message")
    q.add_argument("--json", action="store_true", help="a JSON array (see CONTRACT.md)")
    q.set_defaults(func=cmd_queue_list)
    q = qs.add_parser("show", parents=[common], help="one message: envelope, headers, history")
    q.add_argument("id")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_queue_show)
    q = qs.add_parser("retry", parents=[common], help="make deferred recipients due now")
    q.add_argument("id", nargs="?")
    q.add_argument("--all", action="store_true")
    q.set_defaults(func=cmd_queue_retry)
    for name, helptext in (
        ("hold", "never deliver until released"),
        ("release", "undo hold"),
        ("delete", "remove without delivering (no bounce)"),
    ):
        q = qs.add_parser(name, parents=[common], help=helptext)
        q.add_argument("id")
        q.set_defaults(func=cmd_queue_action, action=name)
    queue.set_defaults(func=lambda a: _usage(queue))
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def load_config(args: argparse.Namespace) -> Config:
    path = config_mod.find_config_file(getattr(args, "config", None))
    return config_mod.load(path)


# -- serve / check-config ------------------------------------------------------------
def setup_logging(fmt: str, level: str) -> None:
    from gannet import maillog
    from gannet.maillog import JsonFormatter

    # Not needed in our lines, and each costs time on every record (frame walk).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    maillog.configure(
        structured=fmt == "json",
        fast_stream=sys.stderr if fmt == "text" and level in ("debug", "info") else None,
    )

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s gannet[%(process)d]: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(args.log_format, args.log_level)
    for warning in config.warnings:
        logging.getLogger("gannet").warning("config: %s", warning)
    from gannet.runtime import Server

    _use_uvloop()
    return asyncio.run(Server(config, args.log_format).run())


def cmd_deliver_worker(args: argparse.Namespace) -> int:
    import pickle
    import signal

    # Only `serve` starts this, writing the config it validated to our stdin.
    config = pickle.load(sys.stdin.buffer)
    if not isinstance(config, Config):
        print("gannet deliver-worker: expected a pickled Config on stdin", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads go through the parent
    setup_logging(args.log_format, "info")
    from gannet.delivery.worker import run_worker

    _use_uvloop()
    return asyncio.run(run_worker(config, args.wake_fd))


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    from gannet.policy.accounts import Accounts, AccountsError
    from gannet.policy.recipients import RecipientTable
    from gannet.server.tls import server_context

    server_context(config.tls, config.file)
    try:
        accounts = Accounts.load(config.mailboxes.users_file)
    except AccountsError as exc:
        raise ConfigError(config.file, "mailboxes.users_file", str(exc)) from exc
    table = RecipientTable.from_config(config.relay, config.mailboxes, accounts)
    for domain in table.missing_postmaster():
        print(
            f"warning: no postmaster@{domain} account or alias (RFC 5321 §4.5.1 requires one)",
            file=sys.stderr,
        )
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{config.file}: OK ({len(config.listen)} listener(s), {len(accounts)} account(s))")
    return EXIT_OK


# -- users ---------------------------------------------------------------------
def cmd_users_add(args: argparse.Namespace) -> int:
    from gannet.policy.accounts import AccountsError, add_account

    config = load_config(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.address}: ")
        if password != getpass.getpass("Again: "):
            print("gannet: the passwords differ; nothing changed", file=sys.stderr)
            return EXIT_USAGE
    if not password:
        print("gannet: an empty password is not allowed", file=sys.stderr)
        return EXIT_USAGE
    domain = args.address.rpartition("@")[2].lower()
    if domain not in config.relay.local_domains:
        print(
            f"gannet: {domain} is not in relay.local_domains of {config.file}; add it there first",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        add_account(config.mailboxes.users_file, args.address, password)
    except (AccountsError, ValueError) as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"added {args.address}")
    return EXIT_OK


def cmd_users_list(args: argparse.Namespace) -> int:
    from gannet.policy.accounts import Accounts

    config = load_config(args)
    for address in Accounts.load(config.mailboxes.users_file).addresses():
        print(address)
    return EXIT_OK


def cmd_users_remove(args: argparse.Namespace) -> int:
    from gannet.policy.accounts import remove_account

    config = load_config(args)
    if not remove_account(config.mailboxes.users_file, args.address):
        print(f"gannet: no account {args.address}", file=sys.stderr)
        return EXIT_NO
    print(f"removed {args.address}")
    return EXIT_OK


# -- queue -----------------------------------------------------------------------
def _with_store(config: Config, work: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from gannet.queue.sqlite import SqliteStore

    path = config.queue.sqlite_path
    if path is None:
        raise ConfigError(config.file, "queue.url", "the PostgreSQL store is not available in this version")

    async def run() -> int:
        store = SqliteStore(
            path,
            spool_dir=config.data_dir / "spool",
            recover=False,
        )
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown_state(view: Any, rcpt: Any) -> str:
    return "held" if view.held and not rcpt.state.is_final else rcpt.state.value


def _message_json(view: Any, history: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": view.queue_id,
        "sender": view.sender,
        "size": view.size,
        "received_at": _iso(view.received_at),
        "recipients": [
            {
                "address": r.address,
                "state": _shown_state(view, r),
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt),
                "last_error": r.last_error or None,
                **({"original": r.original} if r.original else {}),
            }
            for r in view.recipients
        ],
    }
    if history:
        out.update(
            {
                "client": view.client,
                "auth_user": view.auth_user or None,
                "message_id": view.message_id or None,
                "envid": view.envid,
                "ret": view.ret,
                "held": view.held,
                "history": [
                    {"at": _iso(h.at), "recipient": h.recipient or None, "event": h.event, "detail": h.detail}
                    for h in view.history
                ],
            }
        )
    return out


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = load_config(args)

    async def work(store: Any) -> int:
        views = await store.list_messages()
        if args.json:
            print(json.dumps([_message_json(v) for v in views], indent=1))
            return EXIT_OK
        if not views:
            print("the queue is empty")
            return EXIT_OK
        print(f"{'ID':<16} {'SIZE':>8}  {'RECEIVED':<20}  SENDER")
        for v in views:
            print(
                f"{v.queue_id:<16} {v.size:>8}  {_iso(v.received_at):<20}  <{v.sender}>"
                + ("  (held)" if v.held else "")
            )
            for r in v.recipients:
                line = f"{'':<18}{_shown_state(v, r):<11} <{r.address}> attempts={r.attempts}"
                if r.next_attempt and not r.state.is_final:
                    line += f" next={_iso(r.next_attempt)}"
                print(line)
                if r.last_error:
                    print(f"{'':<29}{r.last_error}")
        print(f"-- {len(views)} message(s)")
        return EXIT_OK

    return _with_store(config, work)


def cmd_queue_show(args: argparse.Namespace) -> int:
    from gannet.queue.model import NoSuchMessage

    config = load_config(args)

    async def work(store: Any) -> int:
        try:
            view = await store.get_message(args.id)
        except NoSuchMessage:
            print(
                f"gannet: no message {args.id} in the queue (delivered, bounced or deleted?)", file=sys.stderr
            )
            return EXIT_NO
        body = await store.read_body(args.id)
        head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        if args.json:
            print(json.dumps({**_message_json(view, history=True), "headers": head}, indent=1))
            return EXIT_OK
        data = _message_json(view, history=True)
        print(f"id:          {view.queue_id}")
        print(f"sender:      <{view.sender}>")
        print(f"size:        {view.size}")
        print(f"received:    {data['received_at']} from {view.client}")
        if view.auth_user:
            print(f"auth:        {view.auth_user}")
        if view.held:
            print("held:        yes")
        print("recipients:")
        for r in data["recipients"]:
            print(
                f"  <{r['address']}> {r['state']} attempts={r['attempts']}"
                + (f" next={r['next_attempt']}" if r["next_attempt"] else "")
                + (f"\n      {r['last_error']}" if r["last_error"] else "")
            )
        print("history:")
        for h in data["history"]:
            who = f" <{h['recipient']}>" if h["recipient"] else ""
            print(f"  {h['at']} {h['event']}{who} {h['detail']}")
        print("headers:")
        for line in head.splitlines():
            print(f"  {line}")
        return EXIT_OK

    return _with_store(config, work)


def cmd_queue_retry(args: argparse.Namespace) -> int:
    import time

    if bool(args.id) == bool(args.all):
        print("gannet: give a queue ID or --all", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args)

    async def work(store: Any) -> int:
        n = await store.retry(None if args.all else args.id, time.time())
        print(f"{n} recipient(s) due now")
        return EXIT_OK

    return _with_store(config, work)


def cmd_queue_action(args: argparse.Namespace) -> int:
    import time

    from gannet.queue.model import NoSuchMessage

    config = load_config(args)

    async def work(store: Any) -> int:
        try:
            await getattr(store, args.action)(args.id, time.time())
        except NoSuchMessage:
            print(f"gannet: no message {args.id} in the queue", file=sys.stderr)
            return EXIT_NO
        print(f"{args.id}: {args.action}{'d' if args.action.endswith('e') else 'ed'}")
        return EXIT_OK

    return _with_store(config, work)
