"""One inbound SMTP/LMTP session: the only loop that joins bytes, protocol and policy.

    read → conn.receive_data → conn.next_event → (policy | spool | queue) → conn.send

The protocol core (`gannet.smtp.ServerConnection`) decides everything that is
pure protocol: syntax, command order, limits, the end of DATA. This module
adds what needs the world: who the client is, relay and recipient rules,
passwords, the body spool, the durable enqueue and the log. Replies are
written when the core has no more buffered input (RFC 2920 lets a server
hold replies to pipelined commands until then), so a pipelined group costs
one write.

Two ways in, one handler table: while the task waits for the client, bytes
go to `_on_input` from the transport's callback, which answers every event
in `_HANDLERS` at once and wakes the task only for the three that await
(end of data, credentials, STARTTLS), a full write buffer, or the end.
Waking the task for each command cost a tenth of the server's CPU
(bench/README.md, session 24).

Never answers 250 to the end of data before `store.enqueue()` returned (the
message is durable). Never lets an exception from the network escape: any
unexpected error ends the session with 421 and a log line, and whatever was
not acknowledged is simply not queued.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from gannet import maillog, metrics
from gannet.config import BareNewlinePolicy, Listener, ListenMode
from gannet.mailauth import pipeline as mailauth_pipeline
from gannet.mailauth.spf import SpfOutcome
from gannet.message import headers
from gannet.message.spool import BodySpool
from gannet.policy.recipients import Destination
from gannet.policy.relay import RcptFacts, is_trusted, rcpt_verdict, sender_verdict
from gannet.policy.verdict import Accept
from gannet.queue.ids import new_queue_id
from gannet.queue.model import Body, NewMessage, NewRecipient, QueueError, Transport
from gannet.server import proxy_intake
from gannet.server.services import Services
from gannet.server.tls import describe
from gannet.server.wire import Wire
from gannet.smtp import events as ev
from gannet.smtp import replies as R
from gannet.smtp.replies import Reply
from gannet.smtp.server import BareNewline, ServerConnection, ServerOptions

log = logging.getLogger("gannet.session")

R421_INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection")

TLS_HANDSHAKE_TIMEOUT = 30.0


@dataclass(slots=True)
class Transaction:
    """What RSET clears (aiosmtpd PR #39's rule): one MAIL … DATA exchange."""

    mail: ev.MailFrom
    recipients: list[tuple[ev.RcptTo, list[Destination]]] = field(default_factory=list)
    queue_id: str = ""
    spool: BodySpool | None = None
    message_id: str = ""
    spf: asyncio.Future[SpfOutcome] | None = None  # started at MAIL FROM (gannet/mailauth)

    def discard(self) -> None:
        if self.spf is not None:
            self.spf.cancel()
        if self.spool is not None:
            self.spool.discard()
            self.spool = None


class Session:
    """One connection's life. Create, then `await run()`."""

    def __init__(self, services: Services, listener: Listener, wire: Wire, *, implicit_tls: bool) -> None:
        self.services = services
        self.config = services.config  # one consistent view for the whole session
        self.recipient_table = services.current_recipients()
        self.listener = listener
        self.wire = wire
        self.session_id = new_queue_id()
        self.tls_version = ""
        self.tls_text = ""
        if implicit_tls:
            self.tls_version, self.tls_text = describe(wire.ssl_object)
        self._set_client(*wire.peername())  # until a PROXY header says otherwise
        self.conn = ServerConnection(self._options(tls=implicit_tls))
        self.txn: Transaction | None = None
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        self._out: list[bytes] = []
        self._closing = False
        self._parked = False  # in _read: the client's bytes are handled by _on_input
        self._held: ev.Event | ev.Sentinel | None = None  # what _on_input left for the task
        self._fault: Exception | None = None  # what _on_input raised, for the task to raise
        # How often a parked wait asks `_timeout()` again (a body's timeout may be the shorter).
        self._check_every = min(self.config.smtp.idle_timeout, self.config.smtp.data_timeout)

    def _set_client(self, ip: str, port: int) -> None:
        """Who the client is: relay rules, AUTH on loopback, logs and Received all read this."""
        self.client_ip, self.client_port = ip, port
        self.client = f"[{ip}]:{port}"
        self.trusted, self.loopback = _client_facts(ip, self.config.relay.trusted_networks)

    # -- options ----------------------------------------------------------------
    def _options(self, *, tls: bool) -> ServerOptions:
        mode = self.listener.mode
        smtp = self.config.smtp
        has_tls = self.services.tls_context is not None
        submission = mode in (ListenMode.SUBMISSION, ListenMode.SUBMISSIONS)
        # AUTH only over TLS (RFC 4954 §4), except loopback on mx (local tools, tests).
        auth = mode != ListenMode.LMTP and (tls or (mode == ListenMode.MX and self.loopback))
        return ServerOptions(
            hostname=self.config.hostname,
            lmtp=mode == ListenMode.LMTP,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            bare_newline=BareNewline(smtp.bare_newline.value)
            if smtp.bare_newline is BareNewlinePolicy.NORMALIZE
            else BareNewline.REJECT,
            starttls=has_tls and not tls and mode != ListenMode.SUBMISSIONS,
            auth=auth,
            auth_required=submission,
            tls_required=submission and not tls,
        )

    # -- the loop -----------------------------------------------------------------
    async def run(self) -> None:
        early = b""
        if self.listener.proxy_protocol:  # the load balancer's header says who the client is
            arrival = await proxy_intake.read_header(self.wire, self.listener, self.session_id)
            if arrival is None:  # dropped (logged): no greeting, nothing to answer
                self.wire.close()
                return
            self._set_client(arrival.client_ip, arrival.client_port)
            self.conn.options = self._options(tls=False)  # AUTH on loopback depends on the address
            early = arrival.early
        counters = self.services.counters
        counters.sessions_open += 1
        metrics.session_opened(self.listener.address)
        maillog.connect(self.session_id, self.client, self.listener.address)
        try:
            await self._loop(early)
        except (ConnectionError, OSError) as exc:
            log.info("session %s: connection error from %s: %s", self.session_id, self.client, exc)
        except Exception:
            log.exception("session %s: internal error; closing with 421", self.session_id)
            if not self.conn.closed:
                self._write(self.conn.close_with(R421_INTERNAL_ERROR))
        finally:
            if self.txn is not None:
                self.txn.discard()
            self._flush()
            self.wire.close()
            counters.sessions_open -= 1
            metrics.session_closed(self.listener.address, tls=bool(self.tls_version))
            counters_text = dict(self.counts)
            maillog.disconnect(self.session_id, self.client, counters_text, time.monotonic() - self.started)

    async def _loop(self, early: bytes = b"") -> None:
        conn = self.conn
        if self.services.counters.sessions_open > self.config.smtp.max_sessions:
            busy = R.R421_TOO_BUSY.with_text(f"{self.config.hostname} too many connections")
            self._refused("connect", busy, "too many sessions")
            self._write(conn.send(busy))
            return
        self._write(conn.send(Reply(220, "", f"{self.config.hostname} ESMTP Gannet")))
        if early:  # SMTP bytes that arrived with the PROXY header
            conn.receive_data(early)
        while True:
            event = self._held if self._held is not None else self._pump()
            self._held = None
            if conn.closed:  # a QUIT or a 421, answered here or in _on_input: we close first
                return
            if event is ev.NEED_DATA:
                if self._closing:
                    self._write(conn.close_with(R.R421_SHUTTING_DOWN))
                    return
                self._flush()
                await self.wire.drain()
                if not await self._read():
                    return
            elif isinstance(event, ev.Sentinel):  # PAUSED: only after STARTTLS, handled there
                raise RuntimeError("protocol core paused unexpectedly")
            else:
                await self._dispatch(event)

    def _pump(self) -> ev.Event | ev.Sentinel:
        """Answer every event that needs no await; return the first that does, or a sentinel."""
        conn = self.conn
        while not conn.closed:
            event = conn.next_event()
            handler = _HANDLERS.get(type(event))
            if handler is None:
                return event
            handler(self, event)
        return ev.NEED_DATA

    async def _read(self) -> bool:
        """Wait for the client, answering what needs no await as it arrives
        (`_on_input`); False when the session is over (EOF is fed to the core)."""
        self._parked = True
        try:
            await self.wire.park(self._on_input, self._timeout, self._check_every)
        except TimeoutError:
            timeout = self._timeout()
            log.info("session %s: idle timeout after %.0fs from %s", self.session_id, timeout, self.client)
            self._write(self.conn.close_with(R.R421_TIMEOUT))
            return False
        finally:
            self._parked = False
        if self._fault is not None:  # raised in a callback: handled as if raised here
            fault, self._fault = self._fault, None
            raise fault
        data = self.wire.take()
        if data is not None:
            self.conn.receive_data(data)
        return True

    def _timeout(self) -> float:
        in_body = self.txn is not None and self.txn.spool is not None
        return self.config.smtp.data_timeout if in_body else self.config.smtp.idle_timeout

    def _on_input(self, data: bytes) -> bool:
        """Bytes that arrived while the task was parked: answer what needs no await
        now; True wakes the task for the rest (an event to await, a full write
        buffer, the end, or an error)."""
        try:
            self.conn.receive_data(data)
            event = self._pump()
            self._flush()
        except Exception as exc:
            self._fault = exc
            return True
        if event is ev.NEED_DATA:
            return self.conn.closed or self._closing or self.wire.write_blocked
        self._held = event
        return True

    async def _dispatch(self, event: ev.Event) -> None:
        """The events that need an await; `_HANDLERS` answers the others."""
        if isinstance(event, ev.EndOfData):
            for reply in await self.on_end_of_data():
                self._write(self.conn.send(reply))
        elif isinstance(event, ev.Credentials):
            self.counts["auth"] += 1
            self._write(self.conn.send(await self.on_credentials(event)))
        elif isinstance(event, ev.StartTls):
            self.counts["starttls"] += 1
            await self.on_starttls()
        else:  # a new kind of event with no handler yet: refuse it, as an unknown command
            self.counts[type(event).__name__.lower()] += 1
            self._write(self.conn.send(R.R502_NOT_IMPLEMENTED))

    def _on_body(self, event: ev.BodyChunk) -> None:
        if self.txn is not None and self.txn.spool is not None:
            self.txn.spool.write(event.data)

    def _on_bdat(self, event: ev.Bdat) -> None:
        self.counts["bdat"] += 1
        self._open_spool()

    def _on_refused_message(self, event: ev.MessageRefused) -> None:
        self._end_transaction()
        self._refused("DATA", event.reply)
        self._write(self.conn.send(event.reply))

    def _on_command_error(self, event: ev.CommandError) -> None:
        self.counts["error"] += 1
        maillog.rejected(self.session_id, self.client, "command", event.reply, event.reason)
        self._write(self.conn.send(event.reply))

    # -- command handlers ------------------------------------------------------------
    def on_helo(self, event: ev.Helo) -> Reply:
        self._end_transaction()
        return Reply(250, "", f"{self.config.hostname}")

    def on_ehlo(self, event: ev.Ehlo) -> Reply:
        self._end_transaction()
        return self.conn.ehlo_reply()

    def on_rset(self, event: ev.Rset) -> Reply:
        self._end_transaction()
        return R.R250_RESET

    def on_mail(self, event: ev.MailFrom) -> Reply:
        user = self.conn.authenticated
        if user is not None:
            verdict = sender_verdict(self.recipient_table, user, event.address)
            if not isinstance(verdict, Accept):
                self._refused("MAIL", verdict.reply, verdict.reason, sender=event.address)
                return verdict.reply
        self.txn = Transaction(mail=event)
        checks = self.services.mailauth
        if checks is not None and self._checked():  # started now, SPF's DNS overlaps RCPT and DATA
            self.txn.spf = checks.start_spf(self.client_ip, event.address, self.conn.helo_name or "")
        return R.R250_SENDER_OK

    def _refused(
        self, stage: str, reply: Reply, reason: str = "", *, sender: str | None = None,
        recipient: str | None = None,
    ) -> None:
        """One refusal: its mail-log line, and its count and entry in the dashboard's recent list."""
        subject = f"<{recipient}>" if recipient is not None else ""
        metrics.rejected(self.listener.address, self.client, stage, reply, subject)
        maillog.rejected(
            self.session_id, self.client, stage, reply, reason, sender=sender, recipient=recipient
        )

    def _checked(self) -> bool:
        """Inbound checks run on mx listeners for clients neither authenticated nor trusted."""
        return self.listener.mode == ListenMode.MX and not self.trusted and self.conn.authenticated is None

    def on_rcpt(self, event: ev.RcptTo) -> Reply:
        assert self.txn is not None, "the core emits RcptTo only after an accepted MAIL"
        facts = RcptFacts(self.client_ip, self.conn.authenticated is not None, self.trusted)
        verdict, destinations = rcpt_verdict(self.recipient_table, facts, event.address)
        if not isinstance(verdict, Accept):
            self._refused(
                "RCPT", verdict.reply, verdict.reason, sender=self.txn.mail.address, recipient=event.address
            )
            return verdict.reply
        self.txn.recipients.append((event, destinations))
        return R.R250_RCPT_OK

    def on_data(self, event: ev.Data) -> Reply:
        if self.txn is None or not self.txn.recipients:
            return R.R554_NO_VALID_RECIPIENTS
        self._open_spool()
        return R.R354_START_INPUT

    def _open_spool(self) -> None:
        txn = self.txn
        if txn is None or txn.spool is not None:
            return
        txn.queue_id = new_queue_id()
        spool_dir = self.config.data_dir / "spool"
        txn.spool = BodySpool(spool_dir, txn.queue_id, self.config.queue.inline_body_limit, self._prefix)

    def _prefix(self, facts: headers.HeaderFacts) -> bytes:
        """Gannet's lines above the message: Received, and on submission the missing
        Message-ID and Date (RFC 6409 §8.2, §8.3)."""
        txn = self.txn
        assert txn is not None
        now = self.services.clock.now()
        rcpts = txn.recipients
        info = headers.ReceivedInfo(
            helo=self.conn.helo_name or "",
            client_host="",
            client_ip=self.client_ip,
            by=self.config.hostname,
            protocol=self._protocol_name(),
            queue_id=txn.queue_id,
            recipient=rcpts[0][0].address if len(rcpts) == 1 else None,
            tls=self.tls_text,
        )
        out = headers.received_header(info, now)
        txn.message_id = facts.message_id
        if self.listener.mode in (ListenMode.SUBMISSION, ListenMode.SUBMISSIONS) and facts.complete:
            if not facts.has_message_id:
                txn.message_id = headers.message_id(txn.queue_id, self.config.hostname, now)
                out += f"Message-ID: {txn.message_id}\r\n".encode()
            if not facts.has_date:
                out += f"Date: {headers.rfc5322_date(now)}\r\n".encode()
        return out

    def _protocol_name(self) -> str:
        mail = self.txn.mail if self.txn else None
        return headers.with_protocol(
            esmtp=self.conn.esmtp,
            tls=bool(self.tls_version),
            auth=self.conn.authenticated is not None,
            smtputf8=bool(mail and mail.smtputf8),
            lmtp=self.listener.mode == ListenMode.LMTP,
        )

    async def on_end_of_data(self) -> list[Reply]:
        txn = self.txn
        assert txn is not None and txn.spool is not None
        n_replies = len(txn.recipients) if self.listener.mode == ListenMode.LMTP else 1
        spool = txn.spool
        if spool.facts.received_count > headers.MAX_RECEIVED:
            reply = Reply(554, "5.4.6", "Too many hops (Received headers): mail loop?")
            self._refused("DATA", reply, "mail loop", sender=txn.mail.address)
            self._end_transaction()
            return [reply] * n_replies
        try:
            body = await spool.finish()
            auth = await mailauth_pipeline.process(self._message_facts(txn), body, self.services.mailauth,
                                                   self.services.signer, txn.spf)
            if auth.reject is not None:  # DMARC enforce, p=reject (RFC 7489 §6.6.2)
                self._refused("DATA", auth.reject, auth.reason, sender=txn.mail.address)
                self._end_transaction()
                return [auth.reject] * n_replies
            body = auth.body
            message = self._new_message(txn, body, auth.events)
            in_hand = await self.services.store.enqueue(message)
        except (QueueError, OSError) as exc:
            log.error("%s: could not queue the message from %s: %s", txn.queue_id, self.client, exc)
            self._end_transaction()
            return [R.R451_LOCAL_ERROR] * n_replies
        txn.spool = None  # the store owns the body now
        metrics.received(self.listener.address, [r.domain for r in message.recipients])
        maillog.queued(
            txn.queue_id,
            txn.mail.address,
            body.size,
            (r.address for r, _ in txn.recipients),
            self.client,
            self.tls_version,
            self.conn.authenticated or "",
            txn.message_id,
        )
        if not in_hand:  # else the queue's writer delivers it itself (delivery/local_at_enqueue.py)
            self.services.on_enqueued()
        queue_id = txn.queue_id
        self._end_transaction()
        return [R.queued(queue_id)] * n_replies

    def _message_facts(self, txn: Transaction) -> mailauth_pipeline.MessageFacts:
        """What gannet/mailauth needs to decide: check, sign, seal, strip forged results."""
        mode = self.listener.mode
        return mailauth_pipeline.MessageFacts(
            queue_id=txn.queue_id,
            hostname=self.config.hostname,
            sender=txn.mail.address,
            helo=self.conn.helo_name or "",
            check=self._checked(),
            dmarc=self.listener.dmarc or self.config.mailauth.dmarc,
            strip_forged=not self.trusted,
            sign=mode != ListenMode.LMTP and (self.trusted or self.conn.authenticated is not None),
            forwarded=any(  # an alias expanded to a remote address
                d.transport is Transport.SMTP and d.address.lower() != rcpt.address.lower()
                for rcpt, dests in txn.recipients
                for d in dests
            ),
            max_size=self.config.mailauth.max_verify_size,
        )

    def _new_message(self, txn: Transaction, body: Body, events: tuple[tuple[str, str], ...]) -> NewMessage:
        recipients = []
        seen: set[tuple[str, str]] = set()
        for rcpt, destinations in txn.recipients:
            for d in destinations:
                key = (d.address.lower(), d.mailbox)
                if key in seen:  # an alias and its target both given: deliver once
                    continue
                seen.add(key)
                recipients.append(
                    NewRecipient(
                        address=d.address,
                        transport=d.transport,
                        domain=d.domain,
                        mailbox=d.mailbox,
                        original=rcpt.address if rcpt.address != d.address else "",
                        orcpt=rcpt.orcpt,
                        notify=rcpt.notify.value if rcpt.notify is not None else None,
                    )
                )
        mail = txn.mail
        return NewMessage(
            queue_id=txn.queue_id,
            sender=mail.address,
            recipients=tuple(recipients),
            body=body,
            received_at=self.services.clock.now(),
            envid=mail.envid,
            ret=mail.ret.value if mail.ret else None,
            smtputf8=mail.smtputf8,
            body_8bit=mail.body is ev.BodyType.EIGHT_BIT_MIME,
            client=f"{self.conn.helo_name or ''} {self.client}".strip(),
            auth_user=self.conn.authenticated or "",
            message_id=txn.message_id,
            events=events,
        )

    async def on_credentials(self, event: ev.Credentials) -> Reply:
        username = event.username
        if event.authzid and event.authzid.lower() != username.lower():
            ok = False  # acting as someone else is not supported
        else:
            ok = await self.services.verifier.verify(username, event.password)
        if not ok:
            metrics.auth_failed(self.listener.address, self.client, username, event.mechanism)
            maillog.auth_failed(self.session_id, self.client, username, event.mechanism)
            return R.R535_AUTH_FAILED
        return R.R235_AUTH_OK

    async def on_starttls(self) -> None:
        ctx = self.services.tls_context
        if ctx is None:  # the core only emits StartTls when offered; belt and braces
            self._write(self.conn.send(R.R454_TLS_UNAVAILABLE))
            return
        self._write(self.conn.send(R.R220_GO_AHEAD_TLS))
        self._flush()
        self._end_transaction()
        self.conn.start_tls()  # RFC 3207 §4.2: forget everything, including buffered input
        await self.wire.start_tls(ctx, TLS_HANDSHAKE_TIMEOUT)
        self.tls_version, self.tls_text = describe(self.wire.ssl_object)
        self.conn.options = self._options(tls=True)

    # -- plumbing ------------------------------------------------------------------
    def _end_transaction(self) -> None:
        if self.txn is not None:
            self.txn.discard()
            self.txn = None

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def _flush(self) -> None:
        if self._out:
            self.wire.write(b"".join(self._out))
            self._out.clear()

    def request_close(self) -> None:
        """Graceful shutdown: end the session at the next point where no message is
        in flight (a transaction in progress is allowed to finish)."""
        self._closing = True
        if self._parked and self.txn is None and not self.conn.closed:
            self.wire.write(self.conn.close_with(R.R421_SHUTTING_DOWN))
            self.wire.close()


def _answer(on: Callable[[Session, Any], Reply], count: str) -> Callable[[Session, Any], None]:
    """A plain command's handler: count it, answer it from the session's own state."""

    def handle(session: Session, event: ev.Event) -> None:
        session.counts[count] += 1
        session._write(session.conn.send(on(session, event)))

    return handle


# Every event answered without an await, by type (one table, built once); the
# others (end of data, credentials, STARTTLS) go to the task (`_dispatch`).
_HANDLERS: dict[type, Callable[[Session, Any], None]] = {
    ev.BodyChunk: Session._on_body,
    ev.Bdat: Session._on_bdat,
    ev.EndOfChunk: lambda s, e: s._write(s.conn.send(Reply(250, "2.0.0", f"{e.size} octets received"))),
    ev.MessageRefused: Session._on_refused_message,
    ev.CommandError: Session._on_command_error,
    ev.AuthChallenge: lambda s, e: s._write(s.conn.send(e.reply)),
    ev.ConnectionClosed: lambda s, e: None,
    ev.Helo: _answer(Session.on_helo, "helo"),
    ev.Ehlo: _answer(Session.on_ehlo, "ehlo"),
    ev.MailFrom: _answer(Session.on_mail, "mail"),  # Postfix's names in "disconnect from"
    ev.RcptTo: _answer(Session.on_rcpt, "rcpt"),
    ev.Data: _answer(Session.on_data, "data"),
    ev.Rset: _answer(Session.on_rset, "rset"),
    ev.Noop: _answer(lambda s, e: R.R250_OK, "noop"),
    ev.Vrfy: _answer(lambda s, e: R.R252_CANNOT_VRFY, "vrfy"),
    ev.Help: _answer(lambda s, e: R.R214_HELP, "help"),
    ev.Quit: _answer(lambda s, e: R.R221_BYE, "quit"),
}


@functools.lru_cache(maxsize=4096)
def _client_facts(ip: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> tuple[bool, bool]:
    """(trusted, loopback) for a client address; cached, as clients come back."""
    return is_trusted(ip, networks), _is_loopback(ip)


def _is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
