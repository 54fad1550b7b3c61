"""The `gannet` command line (CONTRACT.md). Thin: parse, call a package, map errors to exit codes.

Exit codes: 0 success; 1 the command ran but the answer is "no" (e.g. no such
message); 2 bad usage or bad config (file, key, reason on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence

from gannet import __version__
from gannet import config as config_mod
from gannet.config import Config, ConfigError
from gannet.logsetup import setup_logging

EXIT_OK, EXIT_NO, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sendmail"]:  # sendmail's own option syntax (-oi, -fADDR …) is not argparse's
        from gannet.admin import sendmail

        return sendmail.main(argv[1:])
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
    s.add_argument("--parent-pid", type=int, default=None)  # the server: the worker ends with it
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
    from gannet.admin.queue_cli import add_filter_arguments

    q = qs.add_parser("list", parents=[common], help="one row per queued recipient, filtered")
    add_filter_arguments(q)
    q.add_argument("--limit", type=int, help="at most this many messages (the oldest)")
    q.add_argument("--json", action="store_true", help="a JSON array (see CONTRACT.md)")
    q.set_defaults(func=cmd_queue, action="list")
    q = qs.add_parser("show", parents=[common], help="one message: envelope, headers, history")
    q.add_argument("id")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_queue, action="show")
    for name, helptext in (
        ("retry", "make deferred recipients due now (--all: flush the queue)"),
        ("hold", "never deliver until released"),
        ("release", "undo hold"),
        ("delete", "remove without delivering (no bounce)"),
    ):
        q = qs.add_parser(name, parents=[common], help=helptext)
        q.add_argument("ids", nargs="*", metavar="ID", help="queue IDs; - reads them from stdin")
        q.add_argument("--all", action="store_true", help="every message (retry: every deferred one)")
        add_filter_arguments(q)
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=cmd_queue, action=name)
    queue.set_defaults(func=lambda a: _usage(queue))

    s = sub.add_parser("trace", parents=[common], help="the timeline of one message")
    s.add_argument("key", metavar="ID|MESSAGE-ID")
    s.add_argument("--json", action="store_true", help="a JSON array of events")
    s.set_defaults(func=cmd_trace)
    sub.add_parser("sendmail", help="sendmail-compatible submission (options: `gannet sendmail -h`)")

    dkim = sub.add_parser("dkim", parents=[common], help="DKIM signing keys")
    ds = dkim.add_subparsers(title="dkim commands", metavar="ACTION")
    d = ds.add_parser("keygen", parents=[common], help="write a new key and print its DNS record")
    d.add_argument("--domain", required=True)
    d.add_argument("--selector", required=True)
    d.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    d.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    d.add_argument("--force", action="store_true", help="replace an existing key file")
    d.set_defaults(func=cmd_dkim_keygen)
    dkim.set_defaults(func=lambda a: _usage(dkim))

    s = sub.add_parser("doctor", parents=[common], help="check a domain's DNS records for mail")
    s.add_argument("domain")
    s.add_argument("--json", action="store_true", help="a JSON array of checks")
    s.add_argument("--address", action="append", default=[], help="this server's address (repeatable)")
    s.set_defaults(func=cmd_doctor)

    db = sub.add_parser("db", parents=[common], help="the queue database")
    ds = db.add_subparsers(title="db commands", metavar="ACTION")
    d = ds.add_parser("migrate", parents=[common], help="create or update the queue schema (serve does too)")
    d.set_defaults(func=cmd_db_migrate)
    db.set_defaults(func=lambda a: _usage(db))
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def load_config(args: argparse.Namespace) -> Config:
    path = config_mod.find_config_file(getattr(args, "config", None))
    return config_mod.load(path)


# -- serve / check-config ------------------------------------------------------------
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
    from gannet.util.parent_watch import exit_with_parent

    if not exit_with_parent(args.parent_pid):
        return 0
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
    from gannet.mailauth.keys import load_keys

    load_keys(config)  # an unreadable or unusable [[dkim]] key: ConfigError, exit 2
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


# -- queue / trace / sendmail (implemented in gannet.admin) ---------------------------
def cmd_queue(args: argparse.Namespace) -> int:
    from gannet.admin import queue_cli

    return queue_cli.main(args, load_config(args))


def cmd_trace(args: argparse.Namespace) -> int:
    from gannet.admin import trace

    return trace.main(args, load_config(args))


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from gannet.queue.configured import migrate
    from gannet.queue.model import QueueError

    config = load_config(args)
    try:
        print(asyncio.run(migrate(config.queue, config.data_dir)))
    except QueueError as exc:
        print(f"gannet db migrate: {exc}", file=sys.stderr)
        return EXIT_NO
    return EXIT_OK


# -- dkim / doctor (implemented in gannet.mailauth) ---------------------------------
def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from gannet.mailauth.keygen import KeygenRefused, keygen
    from gannet.mailauth.keys import KeyAlgorithm

    config = load_config(args)
    try:
        algorithm = KeyAlgorithm(args.algorithm)
        keygen(config, args.domain, args.selector, algorithm, args.bits, args.force, sys.stdout)
    except ValueError as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeygenRefused, OSError) as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_NO
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from gannet.mailauth import doctor

    config = load_config(args)
    try:
        return doctor.main(config, args.domain, args.address, args.json, sys.stdout)
    except ValueError as exc:
        print(f"gannet: {exc}", file=sys.stderr)
        return EXIT_USAGE
