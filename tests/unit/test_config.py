"""Config: good files load with defaults; every bad one names file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gannet import cli
from gannet.config import BareNewlinePolicy, ConfigError, ListenMode, TlsPolicy, load

BASE = """
hostname = "mx.example.test"
[[listen]]
address = "127.0.0.1:2525"
mode = "mx"
[relay]
local_domains = ["Example.TEST"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gannet.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE))
    assert cfg.hostname == "mx.example.test"
    assert cfg.data_dir == tmp_path / "var"
    assert cfg.queue.sqlite_path == tmp_path / "var" / "queue.db"
    assert cfg.queue.lease == 120
    assert cfg.listen[0].mode is ListenMode.MX and cfg.listen[0].port == 2525
    assert cfg.relay.local_domains == ("example.test",)
    assert [str(n) for n in cfg.relay.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    assert cfg.mailboxes.maildir == str(tmp_path / "var" / "mail" / "{domain}" / "{user}")
    assert cfg.mailboxes.users_file == tmp_path / "var" / "users"
    assert cfg.delivery.retry == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert cfg.delivery.give_up_after == 5 * 86400
    assert cfg.smtp.max_message_size == 50 * 1024 * 1024
    assert cfg.smtp.bare_newline is BareNewlinePolicy.REJECT
    assert cfg.postmaster == "postmaster@example.test"
    assert cfg.mailauth.checks and cfg.mailauth.checker_process
    assert cfg.queue.writer_process


def test_durations_sizes_and_ipv6_listeners(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            BASE
            + """
[[listen]]
address = "[::1]:2526"
mode = "lmtp"
[delivery]
retry = ["30s", "1.5m", "2h"]
give_up_after = "1d"
[queue]
lease = "30s"
[smtp]
max_message_size = "10M"
bare_newline = "normalize"
""",
        )
    )
    assert cfg.listen[1].host == "::1" and cfg.listen[1].mode is ListenMode.LMTP
    assert cfg.delivery.retry == (30, 90, 7200)
    assert cfg.delivery.give_up_after == 86400
    assert cfg.queue.lease == 30
    assert cfg.smtp.max_message_size == 10 * 1024 * 1024
    assert cfg.smtp.bare_newline is BareNewlinePolicy.NORMALIZE


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ('[[listen]]\naddress = "127.0.0.1:2527"\nmode = "smtps"\n', "listen[1].mode", "not allowed"),
        ('[[listen]]\naddress = "localhost"\n', "listen[1].address", "not an address"),
        ('[[listen]]\naddress = "127.0.0.1:2525"\n', "listen[1].address", "listed twice"),
        ('[delivery]\nretry = ["5 minutes"]\n', "delivery.retry[0]", "not a duration"),
        ("[delivery]\nport = 70000\n", "delivery.port", "out of range"),
        ('[smtp]\nmax_recipients = "many"\n', "smtp.max_recipients", "must be an integer"),
        ('[smtp]\ncolour = "blue"\n', "smtp.colour", "unknown key"),
        ("[relay2]\n", "relay2", "unknown key"),
        ('[tls]\ncert = "c.pem"\n', "tls.key", "together"),
        ('[queue]\nurl = "mysql://x"\n', "queue.url", "not a queue URL"),
        ('[queue]\nlease = "5s"\n', "queue.lease", "out of range"),
        ('[queue]\nlease = "2h"\n', "queue.lease", "out of range"),
        ("[queue]\nlease = 120\n", "queue.lease", "not a duration"),
        (
            '[mailboxes]\naliases = { "a@other.test" = ["b@example.test"] }\n',
            "mailboxes.aliases",
            "local_domains",
        ),
        ('[mailboxes]\nmaildir = "var/{mailbox}"\n', "mailboxes.maildir", "placeholder"),
        ("[relay]\n", "", "not valid TOML"),  # the table is defined twice
        ('[delivery]\ntls = "sometimes"\n', "delivery.tls", "not allowed"),
        ('[delivery]\ntls_policy = { "x.test" = "always" }\n', "delivery.tls_policy", "not a TLS policy"),
        ("[delivery]\ndestination_concurrency = 0\n", "delivery.destination_concurrency", "out of range"),
        ('[delivery]\nconnection_cache_time = "soon"\n', "delivery.connection_cache_time", "not a duration"),
        ('[mailauth]\nchecker_process = "yes"\n', "mailauth.checker_process", "true or false"),
        ("[queue]\nwriter_process = 1\n", "queue.writer_process", "true or false"),
    ],
)
def test_each_error_names_file_key_and_reason(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert err.file == str(path)
    assert err.key.startswith(key)
    assert reason in str(err)


def test_submission_without_tls_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[[listen]]\naddress = "127.0.0.1:2587"\nmode = "submission"\n')
    with pytest.raises(ConfigError, match=r"listen\[1\]\.mode: submission needs TLS"):
        load(path)


def test_missing_hostname_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hostname: is required"):
        load(write(tmp_path, "data_dir = 'x'\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_testing_keys_are_accepted_with_a_warning(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BASE + "[smtp]\ntesting_fast = true\n"))
    assert any("testing" in w for w in cfg.warnings)


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, BASE)
    assert cli.main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + "[smtp]\nmax_errors = 0\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "smtp.max_errors" in err and "out of range" in err


def test_config_file_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gannet.config import find_config_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GANNET_CONFIG", raising=False)
    assert find_config_file("x.toml") == Path("x.toml")
    monkeypatch.setenv("GANNET_CONFIG", "/somewhere/g.toml")
    assert find_config_file(None) == Path("/somewhere/g.toml")
    monkeypatch.delenv("GANNET_CONFIG")
    write(tmp_path, BASE)
    assert find_config_file(None) == Path("gannet.toml")


@pytest.mark.parametrize(
    ("relay", "key", "reason"),
    [
        ('smarthost_user = "u"\n', "relay.smarthost_user", "relay.smarthost is not"),
        ('smarthost = "10.0.0.1:587"\nsmarthost_user = "u"\n', "relay.smarthost_password_file", "is needed"),
        ('smarthost = "10.0.0.1:587"\nsmarthost_user = "u"\nsmarthost_password_file = "nope"\n',
         "relay.smarthost_password_file", "cannot read nope"),
        ('smarthost = "10.0.0.1:587"\nsmarthost_user = "u"\nsmarthost_password_file = "empty"\n',
         "relay.smarthost_password_file", "the first line is empty"),
    ],
)
def test_smarthost_auth_needs_a_readable_password_file(tmp_path: Path, relay: str, key: str,
                                                        reason: str) -> None:
    (tmp_path / "empty").write_text("\n")
    path = write(tmp_path, BASE + relay)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key and reason in str(info.value)


def test_outbound_delivery_keys(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    cfg = load(write(tmp_path, BASE + 'smarthost = "[10.0.0.1]:587"\nsmarthost_user = "u"\n'
                                      'smarthost_password_file = "pw"\n'
                                      '[delivery]\ntls = "require"\ntls_policy = { "Bank.Test" = "verify" }\n'
                                      'destination_concurrency = 5\nconnection_cache_time = "10s"\n'))
    assert cfg.relay.smarthost_password_file == tmp_path / "pw"
    assert cfg.delivery.tls is TlsPolicy.REQUIRE
    assert cfg.delivery.tls_policy == {"bank.test": TlsPolicy.VERIFY}
    assert (cfg.delivery.destination_concurrency, cfg.delivery.connection_cache_time) == (5, 10.0)
    assert (cfg.delivery.remote_concurrency, cfg.delivery.command_timeout) == (100, 300.0)
