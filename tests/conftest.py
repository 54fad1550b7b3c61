"""Suite-wide fixtures: real peers from tests/peers.py, wrapped for pytest.

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
- ``postfix``, ``dovecot``, ``smtp_sink``: factories for PostfixInstance,
  DovecotImap and SmtpSink, each in its own directory under tmp_path.

Every process a factory starts is stopped when the test ends, whatever its
outcome. A missing program skips the test with the reason (fails it in CI).
"""

from __future__ import annotations

import itertools
import tomllib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest

USERS = peers.USERS


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


@pytest.fixture
def gannet(tmp_path: Path, tls_certs: peers.TlsCerts) -> Iterator[Callable[..., peers.GannetProcess]]:
    started: list[peers.GannetProcess] = []
    counter = itertools.count(1)

    def make(config_extra: str = "", *, users: dict[str, str] | None = None, start: bool = True,
             env: dict[str, str] | None = None, nofile: int | None = None,
             **sections: Any) -> peers.GannetProcess:
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


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[Callable[..., peers.PostfixInstance]]:
    started: list[peers.PostfixInstance] = []
    counter = itertools.count(1)

    def make(**kw: Any) -> peers.PostfixInstance:
        n = next(counter)
        instance = peers.PostfixInstance(tmp_path / ("postfix-work" if n == 1 else f"postfix-work{n}"),
                                         start=False, **kw)
        started.append(instance)
        instance.start()
        return instance

    yield make
    for instance in reversed(started):
        instance.close()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Callable[..., peers.DovecotImap]]:
    started: list[peers.DovecotImap] = []
    counter = itertools.count(1)

    def make(*, users: dict[str, str] | None = None, **kw: Any) -> peers.DovecotImap:
        n = next(counter)
        instance = peers.DovecotImap(tmp_path / ("dovecot-work" if n == 1 else f"dovecot-work{n}"),
                                     users=USERS if users is None else users, start=False, **kw)
        started.append(instance)
        instance.start()
        return instance

    yield make
    for instance in reversed(started):
        instance.close()


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[Callable[..., peers.SmtpSink]]:
    started: list[peers.SmtpSink] = []
    counter = itertools.count(1)

    def make(**kw: Any) -> peers.SmtpSink:
        n = next(counter)
        sink = peers.SmtpSink(tmp_path / ("sink-work" if n == 1 else f"sink-work{n}"), start=False, **kw)
        started.append(sink)
        sink.start()
        return sink

    yield make
    for sink in started:
        sink.stop()
