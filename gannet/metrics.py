"""Gannet's measurements: one function per measured event, as maillog has one per
logged event. The sessions, the delivery agents, the DNS resolver and the queue
writer call these; `gannet.admin` reads them (/metrics, the dashboard).

Counters and histograms are prometheus_client's. `gannet serve` is two
processes (the server and its delivery worker), so they run in
prometheus_client's multiprocess mode: each process writes its values to
memory-mapped files in `data_dir/metrics` (wiped when `serve` starts, so
counters start at zero with the server, as Prometheus expects of a restart),
and the server's /metrics sums the files of both. The directory is named by
the PROMETHEUS_MULTIPROC_DIR environment variable, which prometheus_client
reads when it is first imported: `start_server_process` sets it before the
delivery worker is spawned (the worker inherits it) and before prometheus_client
is imported here (it is imported lazily, in `configure`).

Counts are per recipient (a message to three recipients delivered is three
deliveries), so that received and delivered + bounced add up.

Label cardinality is bounded: `domain` is the recipient domain as-is for the
local and relay domains and for the first `OTHER_DOMAINS` other domains a
process sees; every later one is counted as "other". `listener` is a
[[listen]] address, `type` a DNS record type, `stage` an SMTP stage.

The server also remembers the last `RECENT` authentication failures and
refusals (connection, MAIL, RCPT, DATA) for the dashboard: in memory, lost at
restart (the log keeps them all).

Module state (the instruments, the ring of recent events) is set once per
process by `configure`; until then every function is a no-op, so the CLI and
unit tests that never configure pay nothing. These functions never raise into
mail flow.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("gannet.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER_DOMAINS = 100  # distinct non-local domain labels per process before "other"
OTHER = "other"
RECENT = 200  # recent auth failures and refusals kept for the dashboard
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # network text, shown on a web page and in JSON

# Seconds. Local delivery takes milliseconds, a relay seconds, a retried one hours or days.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EventKind(enum.Enum):
    AUTH_FAILURE = "auth_failure"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class RecentEvent:
    at: float
    kind: EventKind
    listener: str
    client: str
    detail: str  # the user name for AUTH; "STAGE: reply" for refusals


class DomainLabels:
    """Bounded `domain` label values (see the module docstring)."""

    def __init__(self, known: Iterable[str], limit: int = OTHER_DOMAINS) -> None:
        self.known = {d.lower() for d in known}
        self.limit = limit
        self.others: set[str] = set()

    def __call__(self, domain: str) -> str:
        domain = domain.lower()
        if domain in self.known or domain in self.others:
            return domain
        if len(self.others) < self.limit and domain:
            self.others.add(domain)
            return domain
        return OTHER


class _Tally:
    """Counts of the session path's events, applied to the instruments in bulk (`flush`).

    Why: in multiprocess mode each `labels().inc()` takes a lock, asks the kernel
    for the process ID and writes a memory-mapped file: 2.2-3.2 us, ~9 us per
    message sent on a connection of its own, against ~1.5 us here. The events
    only add up, so they are summed here and applied whenever something reads
    the metrics (`registry`, `totals`, `labelled` flush first): a reader never
    sees a stale value. Thread-safe (the lock is uncontended: the loop adds,
    readers flush)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[object, tuple[str, ...]], float] = {}

    def add(self, instrument: object, labels: tuple[str, ...], amount: float = 1.0) -> None:
        key = (instrument, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + amount

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        for (instrument, labels), amount in counts.items():
            instrument.labels(*labels).inc(amount)  # type: ignore[attr-defined]


class _Instruments:
    def __init__(self, registry: CollectorRegistry | None, domains: DomainLabels) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.domains = domains
        self.received = Counter(
            "gannet_messages_received", "Recipients of accepted messages", ["listener", "domain"], registry=r
        )
        self.delivered = Counter("gannet_messages_delivered", "Recipients delivered", ["domain"], registry=r)
        self.deferred = Counter(
            "gannet_messages_deferred", "Delivery attempts deferred (per recipient)", ["domain"], registry=r
        )
        self.bounced = Counter(
            "gannet_messages_bounced", "Recipients failed permanently (bounced)", ["domain"], registry=r
        )
        self.latency = Histogram(
            "gannet_delivery_latency_seconds",
            "From acceptance to delivery, per delivered recipient",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions_open = Gauge(
            "gannet_sessions_open",
            "SMTP/LMTP sessions open",
            ["listener"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.sessions = Counter(
            "gannet_sessions",
            "Sessions ended, by whether TLS was in use at the end",
            ["listener", "tls"],
            registry=r,
        )
        self.auth_failures = Counter(
            "gannet_auth_failures", "Failed AUTH attempts", ["listener", "mechanism"], registry=r
        )
        self.rejections = Counter(
            "gannet_smtp_rejections", "Refused connections and commands", ["listener", "stage"], registry=r
        )
        self.dns = Histogram(
            "gannet_dns_lookup_seconds",
            "DNS queries sent (cache misses)",
            ["type"],
            buckets=DNS_BUCKETS,
            registry=r,
        )
        self.dns_failures = Counter(
            "gannet_dns_lookup_failures", "DNS queries that failed (timeout, SERVFAIL)", ["type"], registry=r
        )
        self.commit = Histogram(
            "gannet_store_commit_seconds",
            "Queue store COMMIT (with or without fsync)",
            ["sync"],
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.recent: deque[RecentEvent] = deque(maxlen=RECENT)
        self.tally = _Tally()


_m: _Instruments | None = None
_registry: CollectorRegistry | None = None


def configure(domains: Iterable[str], *, registry: CollectorRegistry | None = None) -> None:
    """Create the instruments for this process. `domains`: the local and relay
    domains (always their own label). `registry`: where to register them (a
    test's CollectorRegistry); None registers nowhere, for multiprocess mode,
    where the values live in files and `registry()` reads them back."""
    global _m, _registry
    _m = _Instruments(registry, DomainLabels(domains))
    _registry = registry


def disable() -> None:
    """Back to no-ops (tests that configured a registry undo it with this)."""
    global _m, _registry
    _m = None
    _registry = None


class DirectoryBusy(Exception):
    """Another running `gannet serve` owns the metrics directory (the same data_dir)."""


_lock_fd = -1  # held for the life of the server process


def start_server_process(directory: Path, domains: Iterable[str]) -> None:
    """`gannet serve`: an empty multiprocess directory, named in the environment
    (for this process and the delivery worker it starts), then `configure`.
    Raises DirectoryBusy rather than wipe the files of a server still running."""
    global _lock_fd
    directory.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory.parent / "metrics.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryBusy(f"another gannet serve is running on {directory.parent}") from None
    if _lock_fd >= 0:
        os.close(_lock_fd)
    _lock_fd = fd
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    import prometheus_client.values as values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client was imported before the variable was set: choose the
        # file-backed values now, before any instrument exists.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    configure(domains)


def multiprocess() -> bool:
    return MULTIPROC_ENV in os.environ


def registry() -> CollectorRegistry:
    """What to collect for /metrics: every process's files in multiprocess mode,
    else the registry given to `configure`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    flush()
    if _registry is not None:
        return _registry
    if multiprocess():
        out = CollectorRegistry()
        MultiProcessCollector(out)  # type: ignore[no-untyped-call]
        return out
    return CollectorRegistry()


def flush() -> None:
    """Apply the session path's summed events to the instruments (see `_Tally`)."""
    if _m is not None:
        _m.tally.flush()


def recent(kind: EventKind | None = None, limit: int = 50) -> list[RecentEvent]:
    """The latest auth failures and refusals seen by this process, newest first."""
    if _m is None:
        return []
    events = [e for e in reversed(_m.recent) if kind is None or e.kind is kind]
    return events[:limit]


# -- events -------------------------------------------------------------------------------


def received(listener: str, domains: Sequence[str]) -> None:
    """A message was accepted (after its commit) with recipients in `domains`."""
    m = _m
    if m is None:
        return
    for domain in domains:
        m.tally.add(m.received, (listener, m.domains(domain)))


def delivery_outcome(address: str, outcome: str, latency: float) -> None:
    """One recipient's attempt ended: outcome is "delivered", "deferred" or "bounced"."""
    m = _m
    if m is None:
        return
    domain = m.domains(address.rpartition("@")[2])
    if outcome == "delivered":
        m.delivered.labels(domain).inc()
        m.latency.observe(max(latency, 0.0))
    elif outcome == "deferred":
        m.deferred.labels(domain).inc()
    else:
        m.bounced.labels(domain).inc()


def session_opened(listener: str) -> None:
    if _m is not None:
        _m.tally.add(_m.sessions_open, (listener,))


def session_closed(listener: str, tls: bool) -> None:
    m = _m
    if m is not None:
        m.tally.add(m.sessions_open, (listener,), -1.0)
        m.tally.add(m.sessions, (listener, "yes" if tls else "no"))


def auth_failed(listener: str, client: str, username: str, mechanism: str) -> None:
    if _m is not None:
        _m.auth_failures.labels(listener, mechanism.upper()).inc()
        name = _UNSAFE.sub("?", username)[:200]
        _m.recent.append(RecentEvent(time.time(), EventKind.AUTH_FAILURE, listener, client, name))


def rejected(listener: str, client: str, stage: str, reply: object, subject: str = "") -> None:
    """A connection or command was refused (`stage`: connect, MAIL, RCPT, DATA; the
    label). `subject` (e.g. the recipient) goes only into the recent events."""
    if _m is not None:
        _m.rejections.labels(listener, stage.lower()).inc()
        detail = f"{stage} {subject}: {reply}" if subject else f"{stage}: {reply}"
        detail = _UNSAFE.sub("?", detail)[:300]
        _m.recent.append(RecentEvent(time.time(), EventKind.REFUSED, listener, client, detail))


def dns_lookup(rdtype: str, seconds: float, ok: bool) -> None:
    if _m is not None:
        _m.dns.labels(rdtype).observe(seconds)
        if not ok:
            _m.dns_failures.labels(rdtype).inc()


def store_commit(seconds: float, fsync: bool) -> None:
    """Called from the queue writer's thread (prometheus_client values are locked)."""
    if _m is not None:
        _m.commit.labels("fsync" if fsync else "nosync").observe(seconds)


def totals(source: CollectorRegistry | None = None) -> dict[str, float]:
    """Sums over all labels of each counter and gauge, keyed by sample name
    ("gannet_messages_received_total", "gannet_sessions_open", …)."""
    flush()
    out: dict[str, float] = {}
    for family in (source or registry()).collect():
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def labelled(name: str, source: CollectorRegistry | None = None) -> list[tuple[dict[str, str], float]]:
    """Every (labels, value) sample called `name`."""
    flush()
    found: list[tuple[dict[str, str], float]] = []
    for family in (source or registry()).collect():
        found += [(dict(s.labels), float(s.value)) for s in family.samples if s.name == name]
    return found
