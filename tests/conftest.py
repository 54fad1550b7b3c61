"""Suite-wide fixtures: real peers from tests/peers/, wrapped for pytest.

- ``tls_certs`` (session): a trustme CA and a server certificate for
  mx.example.test, localhost and 127.0.0.1, written to files.
- ``gannet``: a factory, ``gannet(config_extra="", *, users=USERS, start=True,
  env=None, **sections) -> GannetProcess``. The base config: hostname
  mx.example.test, listeners mx / submission / submissions on free ports of
  127.0.0.1, the trustme certificate, local domain example.test (trusted
  networks 127.0.0.0/8 and ::1), Maildirs under ``WORKDIR/mail/{domain}/{user}``,
  accounts alice@example.test and bob@example.test (``peers.USERS`` has
  their passwords) added with ``gannet users add``, postmaster@ an alias of alice,
  the admin API on a free port. ``sections`` are merged into it table by
  table (``relay={"trusted_networks": ["127.0.0.9/32"]}``,
  ``smtp={"max_recipients": 3}``, ``listen=[...]`` replaces the listeners);
  ``config_extra`` is TOML text appended as is (new tables only).
- ``postfix``, ``dovecot``, ``smtp_sink``, ``dns_server``: factories for
  PostfixInstance, DovecotImap, SmtpSink and DnsServer (dnsmasq), each in its
  own directory under tmp_path.
- ``haproxy``: a factory for HAProxy (``servers=[...]``, ``send_proxy="v2"``).
- ``postgres_server`` (session): one PostgreSQL (peers.PostgresServer);
  ``postgres_url``: a fresh schema in it for one test, as a queue URL.

Every process a factory starts is stopped when the test ends, whatever its
outcome. A missing program skips the test with the reason (fails it in CI).
"""

from __future__ import annotations

import itertools
import tomllib
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import peers
import pytest

from gannet.queue.sqlite import SqliteStore

USERS = peers.USERS
P = TypeVar("P")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> peers.TlsCerts:
    return peers.make_tls_certs(tmp_path_factory.mktemp("tls"))


def gannet_base_config(workdir: Path, tls: peers.TlsCerts) -> dict[str, Any]:
    """The config every ``gannet`` fixture starts from (see the module docstring)."""
    host = peers.GANNET_HOST
    return {
        "hostname": "mx.example.test",
        "data_dir": str(workdir / "var"),
        "listen": [
            {"address": f"{host}:{peers.free_port(host)}", "mode": "mx"},
            {"address": f"{host}:{peers.free_port(host)}", "mode": "submission"},
            {"address": f"{host}:{peers.free_port(host)}", "mode": "submissions"},
        ],
        "tls": {"cert": str(tls.cert_file), "key": str(tls.key_file)},
        "relay": {"local_domains": ["example.test"], "trusted_networks": ["127.0.0.0/8", "::1/128"]},
        "mailboxes": {
            "maildir": str(workdir / "mail" / "{domain}" / "{user}"),
            "users_file": str(workdir / "users"),
            "aliases": {"postmaster@example.test": ["alice@example.test"]},
        },
        "admin": {"address": f"{host}:{peers.free_port(host)}"},
    }


# The servers the `gannet` fixture started, by test item: a failure shows their logs.
STARTED_GANNETS = pytest.StashKey[list[peers.GannetProcess]]()
LOG_TAIL_LINES = 200


@pytest.fixture
def gannet(
    request: pytest.FixtureRequest, tmp_path: Path, tls_certs: peers.TlsCerts
) -> Iterator[Callable[..., peers.GannetProcess]]:
    started: list[peers.GannetProcess] = []
    request.node.stash[STARTED_GANNETS] = started  # for pytest_runtest_makereport
    counter = itertools.count(1)

    def make(
        config_extra: str = "",
        *,
        users: dict[str, str] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        **sections: Any,
    ) -> peers.GannetProcess:
        n = next(counter)
        workdir = tmp_path / ("gannet" if n == 1 else f"gannet{n}")
        workdir.mkdir(parents=True)
        config = peers.deep_merge(gannet_base_config(workdir, tls_certs), sections)
        text = peers.to_toml(config) + ("\n" + config_extra if config_extra else "")
        tomllib.loads(text)  # a mistake in the test's TOML shows here, not as a Gannet error
        proc = peers.GannetProcess(workdir, text, env=env, start=False, nofile=nofile)
        started.append(proc)
        for address, password in (USERS if users is None else users).items():
            proc.cli("users", "add", address, "--password-stdin", input=password + "\n")
        if start:
            proc.start()
        return proc

    yield make
    for proc in started:
        if proc.running:
            try:
                proc.stop()
            except peers.PeerError as exc:  # killed after SIGTERM failed: say so, keep the test's result
                warnings.warn(str(exc), stacklevel=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that started Gannet shows the tail of each server's log
    with its failure: the work directory is gone once pytest rotates its
    temporary directories, and a failure seen once in a full run (under load)
    must still be readable."""
    if call.when == "call" and call.excinfo is not None:
        for proc in item.stash.get(STARTED_GANNETS, []):
            tail = proc.log_text().splitlines()[-LOG_TAIL_LINES:]
            title = f"{proc.workdir.name}/gannet.log (last {len(tail)} lines)"
            item.add_report_section("call", title, "\n".join(tail))
    yield


def _peer_factory(
    tmp_path: Path, stem: str, build: Callable[..., P], close: Callable[[P], None]
) -> Iterator[Callable[..., P]]:
    """One factory fixture shape for every peer: each call builds an instance in
    its own directory (`stem`, `stem2`, …), starts it, and all are closed at the
    end of the test whatever its outcome."""
    started: list[P] = []
    counter = itertools.count(1)

    def make(**kw: Any) -> P:
        n = next(counter)
        peer = build(tmp_path / (stem if n == 1 else f"{stem}{n}"), start=False, **kw)
        started.append(peer)
        peer.start()  # type: ignore[attr-defined]
        return peer

    yield make
    for peer in reversed(started):
        close(peer)


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[Callable[..., peers.PostfixInstance]]:
    yield from _peer_factory(tmp_path, "postfix-work", peers.PostfixInstance, peers.PostfixInstance.close)


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Callable[..., peers.DovecotImap]]:
    def build(workdir: Path, *, users: dict[str, str] | None = None, **kw: Any) -> peers.DovecotImap:
        return peers.DovecotImap(workdir, users=USERS if users is None else users, **kw)

    yield from _peer_factory(tmp_path, "dovecot-work", build, peers.DovecotImap.close)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[Callable[..., peers.SmtpSink]]:
    yield from _peer_factory(tmp_path, "sink-work", peers.SmtpSink, peers.SmtpSink.stop)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Callable[..., peers.DnsServer]]:
    yield from _peer_factory(tmp_path, "dns-work", peers.DnsServer, peers.DnsServer.close)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., peers.HAProxy]]:
    yield from _peer_factory(tmp_path, "haproxy-work", peers.HAProxy, peers.HAProxy.stop)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.PostgresServer]:
    """One PostgreSQL for the whole session (started on first use; initdb takes seconds).
    Tests get a fresh schema each from ``postgres_url``, or a database of their own
    with ``postgres_server.create_database(name)``."""
    server = peers.PostgresServer(tmp_path_factory.mktemp("postgres"))
    yield server
    server.close()


_schemas = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: peers.PostgresServer) -> str:
    """The URL of a fresh, empty schema for this test (milliseconds, not a database)."""
    return postgres_server.create_schema(f"test_{next(_schemas)}")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite queue in tmp_path (queue.db, spool/). Modules that need
    another store (the contract suite, fakes, PostgreSQL) define their own `store`."""
    (tmp_path / "spool").mkdir(exist_ok=True)
    s = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await s.open()
    try:
        yield s
    finally:
        await s.close()
