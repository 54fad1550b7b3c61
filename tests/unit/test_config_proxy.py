"""Config: `proxy_protocol` and `proxy_from` on [[listen]] (type checks, defaults, refusals)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gannet.config import Config, ConfigError, load

BASE = """
hostname = "mx.example.test"
[tls]
cert = "cert.pem"
key = "key.pem"
[[listen]]
address = "127.0.0.1:2525"
"""


def load_with(tmp_path: Path, listen_extra: str) -> Config:
    path = tmp_path / "gannet.toml"
    path.write_text(BASE + listen_extra)
    return load(path)


def test_off_by_default(tmp_path: Path) -> None:
    cfg = load_with(tmp_path, "")
    lst = cfg.listen[0]
    assert (lst.proxy_protocol, lst.proxy_from) == (False, ())


def test_on_trusts_loopback_balancers_unless_told(tmp_path: Path) -> None:
    cfg = load_with(tmp_path, "proxy_protocol = true\n")
    assert [str(n) for n in cfg.listen[0].proxy_from] == ["127.0.0.0/8", "::1/128"]
    cfg = load_with(tmp_path, 'proxy_protocol = true\nproxy_from = ["10.0.0.5", "2001:db8::/64"]\n')
    assert cfg.listen[0].proxy_from == (
        ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("2001:db8::/64"))


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('proxy_protocol = "yes"\n', "listen[0].proxy_protocol", "true or false"),
    ("proxy_protocol = 1\n", "listen[0].proxy_protocol", "true or false"),
    ('proxy_from = ["127.0.0.1"]\n', "listen[0].proxy_from", "proxy_protocol is not true"),
    ('proxy_protocol = true\nproxy_from = "127.0.0.1"\n', "listen[0].proxy_from", ""),
    ('proxy_protocol = true\nproxy_from = ["lb.example"]\n', "listen[0].proxy_from[0]", "not a network"),
    ("proxy_protocol = true\nproxy_from = []\n", "listen[0].proxy_from", "empty"),
    ('proxy_protocol = true\nmode = "submissions"\n', "listen[0].proxy_protocol", "implicit TLS"),
])
def test_refused(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_with(tmp_path, extra)
    assert err.value.key == key
    assert reason in str(err.value)
