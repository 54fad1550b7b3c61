"""The delivery agents a config asks for, built and wired together: local
delivery (Maildir, or LMTP when `[mailboxes] lmtp` is set), the outbound SMTP
scheduler (MX or `[relay] smarthost`), the bounce builder they share, and the
sweep. The delivery worker process runs them (worker.py); tests build them
directly. Construction only: nothing here touches the network or the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from gannet.clock import Clock
from gannet.config import Config, TlsPolicy
from gannet.delivery.bounces import Bounces
from gannet.delivery.dns import Resolver
from gannet.delivery.local import LocalDelivery
from gannet.delivery.outbound import OutboundOptions
from gannet.delivery.routing import SMARTHOST, NextHop, Route, Router, parse_host_port
from gannet.delivery.scheduler import Scheduler
from gannet.delivery.sweep import Sweep
from gannet.policy.accounts import AccountsFile
from gannet.policy.recipients import RecipientTable
from gannet.queue.configured import owner_name
from gannet.queue.model import Transport
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.delivery")

LOCAL_OWNER = "local"  # Maildir delivery
LMTP_OWNER = "lmtp"
SMTP_OWNER = "smtp"
SWEEP_OWNER = "sweep"
OWNERS = (LOCAL_OWNER, LMTP_OWNER, SMTP_OWNER, SWEEP_OWNER)
GATHER = 0.01  # after a wake-up, collect this long before claiming (see LocalDelivery)
PACE = 0.03  # after a claim of less than half a batch, the same (ClaimLoop._pace)
LMTP_PORT = 24  # RFC 2033 §5 suggests no port; 24 is the IANA "any private mail system" one


@dataclass(slots=True)
class Agents:
    local: LocalDelivery | Scheduler
    remote: Scheduler
    sweep: Sweep
    bounces: Bounces

    def wake(self) -> None:
        self.local.wake()
        self.remote.wake()

    def flush(self) -> None:
        """The postmaster asked for it (`gannet queue retry`): dead destinations are
        tried again (one probing connection first) and everything looks now."""
        for agent in (self.local, self.remote):
            agent.flush() if isinstance(agent, Scheduler) else agent.wake()


class LmtpRoute:
    """`[mailboxes] lmtp`: every local recipient goes to one LMTP server."""

    def __init__(self, target: str, resolver: Resolver) -> None:
        self._fixed: Route | None = None
        self._router: Router | None = None
        if target.startswith("unix:"):
            self._fixed = Route("lmtp", (NextHop("lmtp", target, 0, 0),))
        else:
            host, port = parse_host_port(target, LMTP_PORT)
            self._router = Router(resolver, port=port, own_names=(), smarthost=f"[{host}]:{port}")

    async def route(self, domain: str) -> Route:
        if self._fixed is not None:
            return self._fixed
        assert self._router is not None
        return replace(await self._router.route(domain), destination="lmtp")


def read_secret(path: Path | None) -> str:
    """The first line of a password file (smarthost_password_file)."""
    if path is None:
        return ""
    return path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""


def outbound_options(config: Config) -> Callable[[Route, str], OutboundOptions]:
    """OutboundOptions per destination: the TLS policy of the domain (or of
    "smarthost"), AUTH for the smarthost."""
    d = config.delivery
    base = OutboundOptions(
        helo_name=config.hostname,
        tls=d.tls,
        tls_ca_file=d.tls_ca_file,
        connect_timeout=d.connect_timeout,
        command_timeout=d.command_timeout,
        data_timeout=d.data_timeout,
    )
    auth: tuple[str, str] | None = None
    if config.relay.smarthost and config.relay.smarthost_user:
        auth = (config.relay.smarthost_user, read_secret(config.relay.smarthost_password_file))
    smarthost = replace(base, tls=d.tls_policy.get(SMARTHOST, d.tls), auth=auth)
    lmtp = replace(base, tls=d.tls_policy.get("lmtp", TlsPolicy.NONE), lmtp=True)
    per_domain = {domain: replace(base, tls=policy) for domain, policy in d.tls_policy.items()}

    def options(route: Route, domain: str) -> OutboundOptions:
        if route.destination == SMARTHOST:
            return smarthost
        if route.destination == "lmtp":
            return lmtp
        return per_domain.get(domain, base)

    return options


def build_agents(config: Config, store: QueueStore, clock: Clock) -> Agents:
    accounts = AccountsFile(config.mailboxes.users_file)

    def table() -> RecipientTable:
        return RecipientTable.from_config(config.relay, config.mailboxes, accounts.get())

    bounces = Bounces(store, hostname=config.hostname, table=table)
    agents: list[LocalDelivery | Scheduler] = []

    def wake() -> None:  # DSNs were enqueued, or stuck recipients released: look now
        for agent in agents:
            agent.wake()

    resolver = Resolver(config.dns.nameservers)
    router = Router(
        resolver,
        port=config.delivery.port,
        own_names=(config.hostname,),
        own_addresses=tuple(listener.address for listener in config.listen),
        smarthost=config.relay.smarthost,
    )
    options = outbound_options(config)
    remote = Scheduler(
        store,
        transport=Transport.SMTP,
        owner=owner_name(config.queue, SMTP_OWNER),
        router=router,
        options=options,
        delivery=config.delivery,
        clock=clock,
        bounces=bounces,
        on_enqueued=wake,
        gather=GATHER,
        pace=PACE,
        lease_seconds=config.queue.lease,
    )
    local: LocalDelivery | Scheduler
    if config.mailboxes.lmtp:
        local = Scheduler(
            store,
            transport=Transport.LOCAL,
            owner=owner_name(config.queue, LMTP_OWNER),
            router=LmtpRoute(config.mailboxes.lmtp, resolver),
            options=options,
            delivery=config.delivery,
            clock=clock,
            bounces=bounces,
            lmtp=True,
            on_enqueued=wake,
            gather=GATHER,
            pace=PACE,
            lease_seconds=config.queue.lease,
        )
    else:
        local = LocalDelivery(
            store,
            maildir_template=config.mailboxes.maildir,
            delivery=config.delivery,
            clock=clock,
            owner=owner_name(config.queue, LOCAL_OWNER),
            gather=GATHER,
            pace=PACE,
            batch_sync=config.delivery.maildir_sync == "batch",
            bounces=bounces,
            on_enqueued=wake,
            lease_seconds=config.queue.lease,
        )
    agents += [local, remote]

    sweep = Sweep(
        store,
        delivery=config.delivery,
        clock=clock,
        bounces=bounces,
        interval=config.delivery.sweep_interval,
        keep_history=config.queue.keep_history,
        on_released=wake,
        owner=owner_name(config.queue, SWEEP_OWNER),
        lease_seconds=config.queue.lease,
    )
    return Agents(local=local, remote=remote, sweep=sweep, bounces=bounces)
