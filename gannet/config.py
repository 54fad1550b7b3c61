"""The config file: TOML in, frozen dataclasses out, or a ConfigError.

Every error names the file, the key (dotted, `listen[1].mode`), the reason and
what is allowed, so `gannet check-config` and `gannet serve` can print it and
exit 2 before anything listens. Relative paths are resolved against the
directory of the config file. This module reads the one file and nothing
else: it never opens sockets, certificates or databases (those are checked by
their owners at start-up, with errors in the same shape).

Keys (CONTRACT.md is the interface; the README has the reference with defaults).
The dataclasses themselves are in `config_model` and re-exported here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from gannet.config_model import (
    AdminConfig,
    BareNewlinePolicy,
    Config,
    DeliveryConfig,
    DkimKey,
    DmarcMode,
    DnsConfig,
    Listener,
    ListenMode,
    MailauthConfig,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
    TlsConfig,
    TlsPolicy,
)
from gannet.config_values import ConfigError, ValueReader

__all__ = [
    "AdminConfig",
    "BareNewlinePolicy",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimKey",
    "DmarcMode",
    "DnsConfig",
    "Listener",
    "ListenMode",
    "MailauthConfig",
    "MailboxesConfig",
    "QueueConfig",
    "RelayConfig",
    "SmtpConfig",
    "TlsConfig",
    "TlsPolicy",
    "find_config_file",
    "load",
]

DEFAULT_PATHS = (Path("gannet.toml"), Path("/etc/gannet/gannet.toml"))
LEASE_MIN, LEASE_MAX = 10.0, 3600.0  # [queue] lease, seconds


def find_config_file(explicit: str | None) -> Path:
    """--config, else $GANNET_CONFIG, else ./gannet.toml, else /etc/gannet/gannet.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GANNET_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def load(path: Path) -> Config:
    """Read and validate the file. Raises ConfigError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the config file: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", "the file is not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from exc
    return _Reader(path, doc).config()


class _Reader(ValueReader):
    """Walks the TOML document, checking each key against what is allowed."""

    SECTIONS = {
        "hostname",
        "data_dir",
        "queue",
        "listen",
        "tls",
        "relay",
        "mailboxes",
        "delivery",
        "dns",
        "dkim",
        "mailauth",
        "admin",
        "smtp",
    }

    # -- sections -----------------------------------------------------------
    def config(self) -> Config:
        for k in self.doc:
            if k not in self.SECTIONS:
                raise self.fail(k, "unknown key", ", ".join(sorted(self.SECTIONS)))
        hostname = self.string(self.doc, "hostname", "hostname", "")
        if not hostname:
            raise self.fail("hostname", "is required", "this host's name, e.g. mx.example.test")
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", hostname):
            raise self.fail("hostname", f"{hostname!r} is not a host name")
        data_dir = self.path(self.string(self.doc, "data_dir", "data_dir", "var"))
        relay = self.relay()
        cfg = Config(
            file=self.file.resolve(),
            hostname=hostname,
            data_dir=data_dir,
            listen=self.listeners(),
            queue=self.queue(data_dir),
            tls=self.tls(),
            relay=relay,
            mailboxes=self.mailboxes(data_dir, relay),
            delivery=self.delivery(),
            dns=self.dns(),
            dkim=self.dkim(),
            mailauth=self.mailauth(),
            admin=self.admin(),
            smtp=self.smtp(),
            warnings=(),
        )
        self.cross_checks(cfg)
        return _replace_warnings(cfg, tuple(self.warnings))

    def listeners(self) -> tuple[Listener, ...]:
        entries = self.doc.get("listen", [])
        if not isinstance(entries, list):
            raise self.fail("listen", "must be an array of tables: [[listen]]")
        result = []
        for i, entry in enumerate(entries):
            key = f"listen[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(key, "must be a table")
            self.table({"x": entry}, "x", key, {"address", "mode", "proxy_protocol", "proxy_from", "dmarc"})
            addr = self.string(entry, "address", f"{key}.address", "")
            host, port = self.host_port(addr, f"{key}.address")
            mode = self.enum(entry, "mode", f"{key}.mode", ListenMode, ListenMode.MX)
            proxy = self.boolean(entry, "proxy_protocol", f"{key}.proxy_protocol", False)
            dmarc = None  # this listener's DMARC policy; when absent, [mailauth] dmarc
            if "dmarc" in entry:
                dmarc = self.enum(entry, "dmarc", f"{key}.dmarc", DmarcMode, DmarcMode.ENFORCE)
            result.append(Listener(host, port, mode, proxy, self.proxy_from(entry, key, proxy, mode), dmarc))
        seen: set[tuple[str, int]] = set()
        for i, lst in enumerate(result):
            if (lst.host, lst.port) in seen:
                raise self.fail(f"listen[{i}].address", f"{lst.address} is listed twice")
            seen.add((lst.host, lst.port))
        return tuple(result)

    def proxy_from(
        self, entry: dict[str, Any], key: str, proxy: bool, mode: ListenMode
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Who may send a PROXY header: loopback unless listed (a remote balancer must be named)."""
        if not proxy:
            if "proxy_from" in entry:
                raise self.fail(f"{key}.proxy_from", "is set but proxy_protocol is not true")
            return ()
        if mode is ListenMode.SUBMISSIONS:  # the header would come before the TLS handshake
            raise self.fail(f"{key}.proxy_protocol", "is not supported on submissions (implicit TLS)",
                            "mx, submission or lmtp listeners")
        names = self.strings(entry, "proxy_from", f"{key}.proxy_from") if "proxy_from" in entry else (
            "127.0.0.0/8", "::1/128")
        if not names:
            raise self.fail(f"{key}.proxy_from", "is empty: no load balancer could connect")
        nets = []
        for i, n in enumerate(names):
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except ValueError:
                raise self.fail(f"{key}.proxy_from[{i}]", f"{n!r} is not a network",
                                '"10.0.0.5/32", "::1/128"') from None
        return tuple(nets)

    def host_port(self, value: str, key: str) -> tuple[str, int]:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
        if not m:
            raise self.fail(key, f"{value!r} is not an address", '"127.0.0.1:2525", "[::1]:2525"')
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise self.fail(key, f"port {port} is out of range", "0..65535")
        return host, port

    def queue(self, data_dir: Path) -> QueueConfig:
        keys = {"url", "inline_body_limit", "keep_history", "node", "pool_size", "lease", "writer_process"}
        t = self.table(self.doc, "queue", "queue", keys)
        url = self.string(t, "url", "queue.url", "sqlite:")
        inline = self.size(t, "inline_body_limit", "queue.inline_body_limit", 256 * 1024)
        keep = self.duration(t, "keep_history", "queue.keep_history", 7 * 86400.0)
        lease = self.duration(t, "lease", "queue.lease", 120.0)
        if not LEASE_MIN <= lease <= LEASE_MAX:  # renewed every third: shorter leaves no room for a stall
            raise self.fail("queue.lease", f"{lease:g}s is out of range", '"10s" .. "1h"')
        if url.startswith("sqlite:"):
            rest = url[len("sqlite:") :]
            path = self.path(rest) if rest else data_dir / "queue.db"
            process = self.boolean(t, "writer_process", "queue.writer_process", True)
            return QueueConfig(url, path, inline, keep_history=keep, lease=lease, writer_process=process)
        if url.startswith(("postgresql://", "postgres://")):
            node = self.string(t, "node", "queue.node", "") or _default_node(data_dir)
            if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", node):
                raise self.fail("queue.node", f"{node!r} is not a node name", "1..64 of A-Z a-z 0-9 . _ : -")
            pool = self.integer(t, "pool_size", "queue.pool_size", 10, 2, 1000)
            return QueueConfig(url, None, inline, keep_history=keep, node=node, pool_size=pool, lease=lease)
        raise self.fail(
            "queue.url",
            f"{url!r} is not a queue URL",
            '"sqlite:", "sqlite:PATH", "postgresql://user@host:port/db"',
        )

    def tls(self) -> TlsConfig:
        t = self.table(self.doc, "tls", "tls", {"cert", "key"})
        cert = self.string(t, "cert", "tls.cert", "")
        key = self.string(t, "key", "tls.key", "")
        if bool(cert) != bool(key):
            raise self.fail("tls.key" if cert else "tls.cert", "cert and key must be given together")
        return TlsConfig(self.path(cert), self.path(key)) if cert else TlsConfig()

    def relay(self) -> RelayConfig:
        t = self.table(
            self.doc,
            "relay",
            "relay",
            {
                "local_domains",
                "relay_domains",
                "trusted_networks",
                "smarthost",
                "smarthost_user",
                "smarthost_password_file",
            },
        )
        nets = []
        for i, n in enumerate(
            self.strings(t, "trusted_networks", "relay.trusted_networks")
            if "trusted_networks" in t
            else ("127.0.0.0/8", "::1/128")
        ):
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except ValueError:
                raise self.fail(
                    f"relay.trusted_networks[{i}]", f"{n!r} is not a network", '"127.0.0.0/8", "::1/128"'
                ) from None
        smarthost = self.string(t, "smarthost", "relay.smarthost", "")
        if smarthost:
            self.host_port(smarthost, "relay.smarthost")
        pw = self.string(t, "smarthost_password_file", "relay.smarthost_password_file", "")
        user = self.string(t, "smarthost_user", "relay.smarthost_user", "")
        if user and not smarthost:
            raise self.fail("relay.smarthost_user", "is set but relay.smarthost is not")
        if user and not pw:
            raise self.fail("relay.smarthost_password_file", "is needed with relay.smarthost_user")
        if pw:
            try:
                with open(self.path(pw), encoding="utf-8") as f:
                    if not f.readline().strip():
                        raise self.fail("relay.smarthost_password_file", f"{pw}: the first line is empty")
            except (OSError, UnicodeDecodeError) as exc:
                raise self.fail("relay.smarthost_password_file", f"cannot read {pw}: {exc}") from None
        return RelayConfig(
            local_domains=tuple(
                d.lower().rstrip(".") for d in self.strings(t, "local_domains", "relay.local_domains")
            ),
            relay_domains=tuple(
                d.lower().rstrip(".") for d in self.strings(t, "relay_domains", "relay.relay_domains")
            ),
            trusted_networks=tuple(nets),
            smarthost=smarthost,
            smarthost_user=user,
            smarthost_password_file=self.path(pw) if pw else None,
        )

    def mailboxes(self, data_dir: Path, relay: RelayConfig) -> MailboxesConfig:
        t = self.table(self.doc, "mailboxes", "mailboxes", {"maildir", "users_file", "aliases", "lmtp"})
        template = self.string(t, "maildir", "mailboxes.maildir", "")
        maildir = str(self.path(template)) if template else str(data_dir / "mail" / "{domain}" / "{user}")
        try:
            maildir.format(domain="d", user="u")
        except (KeyError, IndexError, ValueError):
            raise self.fail(
                "mailboxes.maildir", f"{template!r} has an unknown placeholder", "{domain} and {user}"
            ) from None
        users = self.string(t, "users_file", "mailboxes.users_file", "")
        aliases_raw = t.get("aliases", {})
        if not isinstance(aliases_raw, dict):
            raise self.fail("mailboxes.aliases", "must be a table of address = [addresses]")
        aliases: dict[str, tuple[str, ...]] = {}
        for name, targets in aliases_raw.items():
            key = f"mailboxes.aliases.{name!r}"
            if isinstance(targets, str):
                targets = [targets]
            if (
                not isinstance(targets, list)
                or not targets
                or not all(isinstance(x, str) and "@" in x for x in targets)
            ):
                raise self.fail(key, "must be a non-empty list of addresses")
            if "@" not in name:
                raise self.fail(key, "the alias must be a full address (user@domain)")
            aliases[name.lower()] = tuple(targets)
        lmtp = self.string(t, "lmtp", "mailboxes.lmtp", "")
        if lmtp and not lmtp.startswith("unix:"):
            self.host_port(lmtp, "mailboxes.lmtp")
        return MailboxesConfig(
            maildir=maildir,
            users_file=self.path(users) if users else data_dir / "users",
            aliases=aliases,
            lmtp=lmtp,
        )

    def delivery(self) -> DeliveryConfig:
        t = self.table(
            self.doc,
            "delivery",
            "delivery",
            {
                "port",
                "retry",
                "give_up_after",
                "warn_after",
                "local_concurrency",
                "maildir_sync",
                "local_at_enqueue",
                "local_direct",
                "remote_concurrency",
                "destination_concurrency",
                "connect_timeout",
                "command_timeout",
                "data_timeout",
                "connection_cache_time",
                "tls",
                "tls_policy",
                "tls_ca_file",
                "sweep_interval",
            },
        )
        retry_raw = t.get("retry")
        if retry_raw is None:
            retry = DeliveryConfig().retry
        else:
            if not isinstance(retry_raw, list) or not retry_raw:
                raise self.fail(
                    "delivery.retry", "must be a non-empty list of durations", '["1m", "5m", "1h"]'
                )
            retry = tuple(self.parse_duration(v, f"delivery.retry[{i}]") for i, v in enumerate(retry_raw))
        return DeliveryConfig(
            port=self.integer(t, "port", "delivery.port", 25, 1, 65535),
            retry=retry,
            give_up_after=self.duration(t, "give_up_after", "delivery.give_up_after", 5 * 86400),
            warn_after=self.duration(t, "warn_after", "delivery.warn_after", 4 * 3600),
            local_concurrency=self.integer(t, "local_concurrency", "delivery.local_concurrency", 8, 1, 256),
            maildir_sync=self.choice(t, "maildir_sync", "delivery.maildir_sync", ("batch", "file"), "batch"),
            local_at_enqueue=self.boolean(t, "local_at_enqueue", "delivery.local_at_enqueue", True),
            local_direct=self.boolean(t, "local_direct", "delivery.local_direct", True),
            remote_concurrency=self.integer(
                t, "remote_concurrency", "delivery.remote_concurrency", 100, 1, 10000
            ),
            destination_concurrency=self.integer(
                t, "destination_concurrency", "delivery.destination_concurrency", 20, 1, 1000
            ),
            connect_timeout=self.duration(t, "connect_timeout", "delivery.connect_timeout", 30.0),
            command_timeout=self.duration(t, "command_timeout", "delivery.command_timeout", 300.0),
            data_timeout=self.duration(t, "data_timeout", "delivery.data_timeout", 600.0),
            connection_cache_time=self.duration(
                t, "connection_cache_time", "delivery.connection_cache_time", 2.0
            ),
            tls=self.enum(t, "tls", "delivery.tls", TlsPolicy, TlsPolicy.MAY),
            tls_policy=self.tls_policies(t),
            sweep_interval=self.duration(t, "sweep_interval", "delivery.sweep_interval", 60.0),
            tls_ca_file=self.path(ca)
            if (ca := self.string(t, "tls_ca_file", "delivery.tls_ca_file", ""))
            else None,
        )

    def tls_policies(self, t: dict[str, Any]) -> dict[str, TlsPolicy]:
        raw = t.get("tls_policy", {})
        if not isinstance(raw, dict):
            raise self.fail(
                "delivery.tls_policy", "must be a table of domain = policy", '{ "example.org" = "verify" }'
            )
        allowed = ", ".join(p.value for p in TlsPolicy)
        policies: dict[str, TlsPolicy] = {}
        for domain, value in raw.items():
            try:
                policies[domain.lower().rstrip(".")] = TlsPolicy(value)
            except ValueError:
                raise self.fail(
                    f"delivery.tls_policy.{domain!r}", f"{value!r} is not a TLS policy", allowed
                ) from None
        return policies

    def dns(self) -> DnsConfig:
        t = self.table(self.doc, "dns", "dns", {"nameservers"})
        servers = self.strings(t, "nameservers", "dns.nameservers")
        for i, s in enumerate(servers):
            host = s.rsplit(":", 1)[0].strip("[]") if s.count(":") == 1 or s.startswith("[") else s
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise self.fail(
                    f"dns.nameservers[{i}]", f"{s!r} is not an IP address", '"127.0.0.1", "127.0.0.1:5353"'
                ) from None
        return DnsConfig(servers)

    def dkim(self) -> tuple[DkimKey, ...]:
        entries = self.doc.get("dkim", [])
        if not isinstance(entries, list):
            raise self.fail("dkim", "must be an array of tables: [[dkim]]")
        keys = []
        for i, e in enumerate(entries):
            key = f"dkim[{i}]"
            if not isinstance(e, dict):
                raise self.fail(key, "must be a table")
            self.table({"x": e}, "x", key, {"domain", "selector", "key_file"})
            domain = self.string(e, "domain", f"{key}.domain", "")
            selector = self.string(e, "selector", f"{key}.selector", "")
            key_file = self.string(e, "key_file", f"{key}.key_file", "")
            for name, val in (("domain", domain), ("selector", selector), ("key_file", key_file)):
                if not val:
                    raise self.fail(f"{key}.{name}", "is required")
            keys.append(DkimKey(domain.lower(), selector, self.path(key_file)))
        return tuple(keys)

    def mailauth(self) -> MailauthConfig:
        keys = {"dmarc", "checks", "max_verify_size", "checker_process"}
        t = self.table(self.doc, "mailauth", "mailauth", keys)
        d = MailauthConfig()
        return MailauthConfig(
            dmarc=self.enum(t, "dmarc", "mailauth.dmarc", DmarcMode, d.dmarc),
            checks=self.boolean(t, "checks", "mailauth.checks", d.checks),
            max_verify_size=self.size(t, "max_verify_size", "mailauth.max_verify_size", d.max_verify_size),
            checker_process=self.boolean(t, "checker_process", "mailauth.checker_process", d.checker_process),
        )

    def admin(self) -> AdminConfig:
        t = self.table(self.doc, "admin", "admin", {"address", "token_file"})
        address = self.string(t, "address", "admin.address", "127.0.0.1:8025")
        token = self.string(t, "token_file", "admin.token_file", "")
        if address:  # "" = no admin server
            host, _ = self.host_port(address, "admin.address")
            if not token and not _is_loopback_host(host):
                raise self.fail(
                    "admin.token_file",
                    f"is required: admin.address {address} is not a loopback address, and the API "
                    "can hold, delete and read mail",
                    "a file whose first line is the bearer token, or a 127.0.0.1/[::1] address",
                )
        if token:  # read by the admin server at start; checked here so that a typo exits 2
            try:
                with open(self.path(token), encoding="utf-8") as f:
                    if len(f.readline().strip()) < 16:
                        reason = f"{token}: the first line must hold the token (16+ characters)"
                        raise self.fail("admin.token_file", reason)
            except (OSError, UnicodeDecodeError) as exc:
                raise self.fail("admin.token_file", f"cannot read {token}: {exc}") from None
        return AdminConfig(address, self.path(token) if token else None)

    def smtp(self) -> SmtpConfig:
        t = self.table(
            self.doc,
            "smtp",
            "smtp",
            {
                "max_message_size",
                "max_recipients",
                "max_errors",
                "idle_timeout",
                "data_timeout",
                "max_sessions",
                "bare_newline",
            },
        )
        d = SmtpConfig()
        return SmtpConfig(
            max_message_size=self.size(t, "max_message_size", "smtp.max_message_size", d.max_message_size),
            max_recipients=self.integer(
                t, "max_recipients", "smtp.max_recipients", d.max_recipients, 1, 100000
            ),
            max_errors=self.integer(t, "max_errors", "smtp.max_errors", d.max_errors, 1, 10000),
            idle_timeout=self.duration(t, "idle_timeout", "smtp.idle_timeout", d.idle_timeout),
            data_timeout=self.duration(t, "data_timeout", "smtp.data_timeout", d.data_timeout),
            max_sessions=self.integer(t, "max_sessions", "smtp.max_sessions", d.max_sessions, 1, 1000000),
            bare_newline=self.enum(t, "bare_newline", "smtp.bare_newline", BareNewlinePolicy, d.bare_newline),
        )

    def cross_checks(self, cfg: Config) -> None:
        needs_tls = [
            i
            for i, lst in enumerate(cfg.listen)
            if lst.mode in (ListenMode.SUBMISSION, ListenMode.SUBMISSIONS)
        ]
        if needs_tls and not cfg.tls.enabled:
            i = needs_tls[0]
            raise self.fail(
                f"listen[{i}].mode", f"{cfg.listen[i].mode.value} needs TLS, but [tls] cert/key are not set"
            )
        for name in cfg.mailboxes.aliases:
            if name.rpartition("@")[2] not in cfg.relay.local_domains:
                raise self.fail(
                    f"mailboxes.aliases.{name!r}", "the alias is not in one of relay.local_domains"
                )
        if not cfg.listen:
            self.warnings.append("no [[listen]] entries: Gannet will accept no mail")


def _default_node(data_dir: Path) -> str:
    """`[queue] node` when not set: the host name and a hash of the data directory,
    stable across restarts (a restarted node must find its own leases) and
    distinct for two nodes on one host (each has its own data_dir)."""
    import hashlib
    import socket

    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname().split(".")[0])[:40] or "node"
    return f"{host}-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]}"


def _replace_warnings(cfg: Config, warnings: tuple[str, ...]) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, warnings=warnings)


def _is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost": only this machine can reach the admin server."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
