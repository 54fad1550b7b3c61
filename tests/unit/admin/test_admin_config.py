"""[admin]: a non-loopback address needs a token file; the token file must be
readable and hold a token; "" turns the admin server off."""

from __future__ import annotations

from pathlib import Path

import pytest

from gannet import cli
from gannet.config import ConfigError, load

BASE = """
hostname = "mx.example.test"
[[listen]]
address = "127.0.0.1:2525"
[relay]
local_domains = ["example.test"]
"""


def config(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "gannet.toml"
    path.write_text(BASE + "[admin]\n" + admin)
    return path


@pytest.mark.parametrize("address", ["127.0.0.1:8025", "[::1]:8025", "localhost:8025", "127.0.0.9:80"])
def test_loopback_needs_no_token(tmp_path: Path, address: str) -> None:
    cfg = load(config(tmp_path, f'address = "{address}"\n'))
    assert cfg.admin.address == address and cfg.admin.token_file is None


def test_default_and_off(tmp_path: Path) -> None:
    path = tmp_path / "gannet.toml"
    path.write_text(BASE)
    assert load(path).admin.address == "127.0.0.1:8025"
    assert load(config(tmp_path, 'address = ""\n')).admin.address == ""


@pytest.mark.parametrize(
    "address", ["0.0.0.0:8025", "[::]:8025", "192.0.2.10:8025", "admin.example.test:8025"]
)
def test_elsewhere_needs_a_token_file(
    tmp_path: Path, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, f'address = "{address}"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "admin.token_file" and "not a loopback address" in str(err.value)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    assert "admin.token_file" in capsys.readouterr().err


def test_a_token_file_makes_any_address_acceptable(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    cfg = load(config(tmp_path, 'address = "0.0.0.0:8025"\ntoken_file = "token"\n'))
    assert cfg.admin.token_file == tmp_path / "token"


@pytest.mark.parametrize(
    "content, reason",
    [(None, "cannot read"), ("\n", "must hold the token"), ("short\n", "must hold the token")],
)
def test_a_bad_token_file_is_a_config_error(tmp_path: Path, content: str | None, reason: str) -> None:
    if content is not None:
        (tmp_path / "token").write_text(content)
    with pytest.raises(ConfigError) as err:
        load(config(tmp_path, 'address = "127.0.0.1:8025"\ntoken_file = "token"\n'))
    assert err.value.key == "admin.token_file" and reason in str(err.value)
