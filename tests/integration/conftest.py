"""Fixtures for the integration tests: one `gannet serve` shared by a module.

`server`: a real Gannet with every listener mode (mx, submission,
submissions, lmtp), small limits so that refusals are cheap to reach, and
127.0.0.1 NOT trusted (127.0.0.9 is: clients bind it as their source address
to be "inside"). Starting one costs ~1 s (Python, argon2 for the accounts).
"""

from __future__ import annotations

from collections.abc import Iterator

import peers
import pytest
from conftest import USERS, gannet_base_config

TRUSTED = "127.0.0.9"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tls_certs: peers.TlsCerts
) -> Iterator[peers.GannetProcess]:
    workdir = tmp_path_factory.mktemp("gannet-session")
    config = gannet_base_config(workdir, tls_certs)
    host = peers.GANNET_HOST
    config["listen"].append({"address": f"{host}:{peers.free_port(host)}", "mode": "lmtp"})
    config["relay"]["trusted_networks"] = [f"{TRUSTED}/32"]
    config["relay"]["relay_domains"] = ["backup.test"]
    config["mailboxes"]["aliases"] = {
        "postmaster@example.test": ["alice@example.test"],
        "team@example.test": ["alice@example.test", "bob@example.test"],
        "rené@example.test": ["alice@example.test"],
    }
    config["smtp"] = {"max_recipients": 5, "max_message_size": "2M", "max_errors": 5}
    config["queue"] = {"inline_body_limit": "64K"}
    proc = peers.GannetProcess(workdir, peers.to_toml(config), start=False)
    for address, password in USERS.items():
        proc.cli("users", "add", address, "--password-stdin", input=password + "\n")
    proc.start()
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]
