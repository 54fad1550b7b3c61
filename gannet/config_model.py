"""The config's values: enums and frozen dataclasses, one per TOML table.

What `gannet.config.load` returns and every other module reads; `gannet.config`
re-exports all of it, so import from there. Pure data: no parsing, no I/O
(the parsing and its errors are `gannet.config`'s).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path


class ListenMode(enum.Enum):
    MX = "mx"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"
    LMTP = "lmtp"


class DmarcMode(enum.Enum):
    ENFORCE = "enforce"
    REPORT = "report"
    OFF = "off"


class BareNewlinePolicy(enum.Enum):
    REJECT = "reject"
    NORMALIZE = "normalize"


class TlsPolicy(enum.Enum):
    """Outbound TLS for one destination (Postfix's smtp_tls_security_level)."""

    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, certificate not checked; plaintext if the handshake fails
    REQUIRE = "require"  # STARTTLS or no delivery (defer); certificate not checked
    VERIFY = "verify"  # STARTTLS with a certificate valid for the MX host name, or defer


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    mode: ListenMode
    proxy_protocol: bool = False  # a PROXY header (v1 or v2) comes first on every connection
    # Who may send that header (the load balancers); anyone else is dropped at connect.
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dmarc: DmarcMode | None = None  # this listener's DMARC policy; None = [mailauth] dmarc

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class QueueConfig:
    url: str = "sqlite:"
    sqlite_path: Path | None = None  # resolved from url "sqlite:" / "sqlite:PATH"
    inline_body_limit: int = 256 * 1024  # bodies above this are spooled to a file while arriving
    keep_history: float = 7 * 86400.0  # a finished message's trace is kept this long (seconds)
    # PostgreSQL: this node's name among those sharing the queue (lease owners are
    # "NODE/agent"); default hostname-HASH of data_dir. "" with SQLite (one node).
    node: str = ""
    pool_size: int = 10  # PostgreSQL: connections per process (the server and its delivery worker)
    # How long a delivery claim lasts unless its worker renews it (every third of it,
    # while it holds the work): a dead worker's mail is free again within about this.
    lease: float = 120.0
    # SQLite: the server's enqueue transactions run in a child process of their own
    # (queue/sqlite_enqueue_process.py) instead of a thread sharing the sessions' GIL.
    writer_process: bool = True


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MailboxesConfig:
    maildir: str  # template with {domain} and {user}, absolute after resolution
    users_file: Path
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lmtp: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    port: int = 25
    retry: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    give_up_after: float = 5 * 86400
    warn_after: float = 4 * 3600
    local_concurrency: int = 8  # Maildir writers working at once
    maildir_sync: str = "batch"  # "batch": syncfs once per batch (Linux >= 5.8); "file": fsync per file
    # The SQLite queue's enqueue writer process writes fresh local mail into its
    # Maildirs itself (delivery/local_at_enqueue.py); the delivery loop does the rest.
    local_at_enqueue: bool = True
    # With local_at_enqueue: a message whose every recipient is local is written
    # into its Maildirs before the 250 and never queued (delivery/local_direct.py).
    local_direct: bool = True
    remote_concurrency: int = 100  # outbound SMTP connections open at once, all destinations
    destination_concurrency: int = 20  # outbound connections to one destination
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2: 5 minutes for most replies
    data_timeout: float = 600.0  # RFC 5321 §4.5.3.2.6: 10 minutes for the reply to the final "."
    connection_cache_time: float = 2.0  # an idle outbound connection is kept this long for reuse
    tls: TlsPolicy = TlsPolicy.MAY  # outbound STARTTLS, every destination without its own entry
    tls_policy: dict[str, TlsPolicy] = field(default_factory=dict)  # domain (or "smarthost") → policy
    tls_ca_file: Path | None = None  # CA bundle for "verify" (default: the system's)
    sweep_interval: float = 60.0  # how often the queue is swept for expired and stuck recipients


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True, slots=True)
class MailauthConfig:
    dmarc: DmarcMode = DmarcMode.ENFORCE
    checks: bool = True  # SPF/DKIM/DMARC/ARC on mx listeners for untrusted, unauthenticated clients
    max_verify_size: int = 10 * 1024 * 1024  # larger messages are not loaded for DKIM/ARC (nor signed)
    checker_process: bool = True  # DKIM/ARC/DMARC at the end of data in a child process (another core)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    address: str = "127.0.0.1:8025"
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Limits and protocol choices of the listeners (all optional keys)."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20
    idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7 asks servers for at least 5 minutes
    data_timeout: float = 600.0
    max_sessions: int = 20000
    bare_newline: BareNewlinePolicy = BareNewlinePolicy.REJECT


@dataclass(frozen=True, slots=True)
class Config:
    file: Path
    hostname: str
    data_dir: Path
    listen: tuple[Listener, ...]
    queue: QueueConfig
    tls: TlsConfig
    relay: RelayConfig
    mailboxes: MailboxesConfig
    delivery: DeliveryConfig
    dns: DnsConfig
    dkim: tuple[DkimKey, ...]
    mailauth: MailauthConfig
    admin: AdminConfig
    smtp: SmtpConfig
    warnings: tuple[str, ...] = ()

    @property
    def postmaster(self) -> str:
        """Where double bounces go (CONTRACT.md)."""
        return f"postmaster@{self.relay.local_domains[0]}" if self.relay.local_domains else ""
