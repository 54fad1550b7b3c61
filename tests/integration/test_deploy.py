"""deploy/: the sample config passes `gannet check-config` and the systemd unit
passes `systemd-analyze verify`, both as shipped except for where the files
live (the test cannot write /etc or /var/lib, so those prefixes are moved into
a temporary directory and the unit's program path points at this checkout's
gannet).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import peers

DEPLOY = peers.REPO / "deploy"


def test_the_sample_config_is_for_a_real_host() -> None:
    doc = tomllib.loads((DEPLOY / "gannet.toml").read_text())
    assert doc["data_dir"] == "/var/lib/gannet"
    ports = {(e["address"].rsplit(":", 1)[1], e["mode"]) for e in doc["listen"]}
    assert ports == {("25", "mx"), ("587", "submission"), ("465", "submissions")}
    assert all(str(v).startswith("/etc/gannet/") for v in doc["tls"].values())


def test_the_sample_config_passes_check_config(tmp_path: Path, tls_certs: peers.TlsCerts) -> None:
    text = (DEPLOY / "gannet.toml").read_text()
    moved = text.replace("/var/lib/gannet", str(tmp_path / "var/lib/gannet")).replace(
        "/etc/gannet", str(tmp_path / "etc/gannet")
    )
    assert moved.replace(str(tmp_path), "") == text, "only the path prefixes differ"
    (tmp_path / "etc/gannet/tls").mkdir(parents=True)
    shutil.copy(tls_certs.cert_file, tmp_path / "etc/gannet/tls/fullchain.pem")
    shutil.copy(tls_certs.key_file, tmp_path / "etc/gannet/tls/privkey.pem")
    config = tmp_path / "etc/gannet/gannet.toml"
    config.write_text(moved)
    (tmp_path / "var/lib/gannet").mkdir(parents=True)
    # As the README says: the account the postmaster and abuse aliases point at.
    peers.gannet_cli(config, "users", "add", "admin@example.org", "--password-stdin", input="secret-pw\n")
    r = peers.gannet_cli(config, "check-config", check=False)
    assert r.returncode == 0, r.stderr
    assert "OK (6 listener(s), 1 account(s))" in r.stdout
    assert "warning" not in r.stderr, r.stderr


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = peers.need("systemd-analyze")
    unit = (DEPLOY / "gannet.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    for line in (
        "User=gannet",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/gannet",
        "PrivateTmp=yes",
    ):
        assert line in unit.splitlines(), line
    gannet = Path(sys.executable).parent / "gannet"
    assert gannet.exists(), "the console script (pip install -e .)"
    path = tmp_path / "gannet.service"
    path.write_text(unit.replace("/usr/local/bin/gannet", str(gannet)))
    r = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
