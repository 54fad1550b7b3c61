"""Crash safety: Gannet is SIGKILLed while clients send; every 250 survives, every refusal stays out.

smtp-source cannot say which messages got a 250, so this test drives its own
client pool: 10 threads, each a real SMTP client (smtplib) sending up to 5
messages per connection from a shared list of 3,000, each message with its
own Message-ID, recording the reply it got to the end of DATA. Some messages
are made to be refused: every 10th to an unknown user (550 at RCPT), every
10th too large (552 after DATA, no SIZE= declared), every 10th with a bare LF
(refused after DATA by default). Once 300 messages have been accepted, Gannet
is killed with SIGKILL, the clients stop at their next error, and Gannet is
restarted on the same data directory. Then:

- every Message-ID that got "250" is in a Maildir (DESIGN.md principle 1
  allows a crash to deliver a message twice, never zero times);
- no Message-ID that got a 4xx/5xx reply is in any Maildir;
- messages cut off without a reply may be either; they are only counted;
- the restarted Gannet accepts and delivers new mail, and its queue empties.
"""

from __future__ import annotations

import itertools
import smtplib
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import peers
import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MESSAGES = 3000
SESSIONS = 10
PER_CONNECTION = 5
KILL_AFTER_ACCEPTED = 300
MAX_SIZE = 64 * 1024


@dataclass(frozen=True)
class Sent:
    message_id: str
    kind: str  # "accepted" (250 after DATA), "refused" (a 4xx/5xx reply), "unknown" (no reply)
    reply: str


class ClientPool:
    """SESSIONS threads sending MESSAGES numbered messages, recording each outcome."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.token = uuid.uuid4().hex[:8]
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.results: list[Sent] = []
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(SESSIONS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 60) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not finish"

    def count(self, kind: str) -> int:
        return sum(1 for r in list(self.results) if r.kind == kind)

    def message(self, n: int) -> tuple[str, str, bytes]:
        """(Message-ID, recipient, DATA) of message n."""
        message_id = f"<crash-{self.token}-{n}@crash.client.test>"
        rcpt = ("alice@example.test", "bob@example.test")[n % 2]
        body = f"message {n}\r\n" * 20
        if n % 10 == 3:
            rcpt = "nobody@example.test"
        elif n % 10 == 6:
            body = "x" * 76 + "\r\n"
            body *= MAX_SIZE // 78 + 200
        elif n % 10 == 8:
            body = f"message {n}\r\nbare\nline feed\r\n"
        data = (f"From: crash@client.test\r\nTo: {rcpt}\r\nSubject: crash test {n}\r\n"
                f"Message-ID: {message_id}\r\n\r\n{body}").encode()
        return message_id, rcpt, data

    def _next(self) -> int | None:
        with self._lock:
            n = next(self._numbers)
        return n if n < MESSAGES and not self.stop.is_set() else None

    def _worker(self) -> None:
        while (n := self._next()) is not None:
            try:
                client = smtplib.SMTP(*self.address, timeout=15)
                client.ehlo("crash.client.test")
            except (OSError, smtplib.SMTPException):
                return  # the server is gone: stop sending, as a real client would give up for now
            try:
                for _ in range(PER_CONNECTION):
                    self.results.append(self._send(client, n))
                    if self.results[-1].kind == "unknown":
                        return
                    next_n = self._next()
                    if next_n is None:
                        break
                    n = next_n
                client.quit()
            except (OSError, smtplib.SMTPException):
                pass
            finally:
                client.close()

    def _send(self, client: smtplib.SMTP, n: int) -> Sent:
        message_id, rcpt, data = self.message(n)
        try:
            code, reply = client.mail("crash@client.test")
            if code == 250:
                code, reply = client.rcpt(rcpt)
            if code not in (250, 251):
                client.rset()
                return Sent(message_id, "refused", f"{code} {reply.decode()}")
            code, reply = client.data(data)  # raises only if DATA itself is refused
            return Sent(message_id, "accepted" if code == 250 else "refused", f"{code} {reply.decode()}")
        except smtplib.SMTPDataError as exc:
            return Sent(message_id, "refused", f"{exc.smtp_code} {exc.smtp_error.decode()}")
        except (OSError, smtplib.SMTPException) as exc:
            return Sent(message_id, "unknown", repr(exc))


def test_sigkill_while_sending_loses_no_accepted_message(
        gannet: Callable[..., peers.GannetProcess]) -> None:
    g = gannet(smtp={"max_message_size": MAX_SIZE})
    pool = ClientPool(*g.address())
    pool.start()
    try:
        peers.wait_for(lambda: pool.count("accepted") >= KILL_AFTER_ACCEPTED, 120,
                       f"{KILL_AFTER_ACCEPTED} accepted messages")
        g.kill()
    finally:
        pool.stop.set()
        pool.join()
    assert len(pool.results) < MESSAGES, "the clients had finished before the kill: nothing was tested"

    g.start()
    accepted = {r.message_id for r in pool.results if r.kind == "accepted"}
    refused = {r.message_id for r in pool.results if r.kind == "refused"}
    unknown = {r.message_id for r in pool.results if r.kind == "unknown"}
    assert accepted and refused, "expected both accepted and refused messages before the kill"
    odd = [r for r in pool.results if r.kind == "accepted" and not r.reply.startswith("250 2.0.0 queued as ")]
    assert not odd, f"250 replies without 'queued as ID': {odd[:3]}"

    def delivered_ids() -> Counter[str]:
        return Counter(peers.message_ids(g.delivered()))
    try:
        peers.wait_progress(lambda: len(accepted & set(delivered_ids())), len(accepted), stall=30,
                            what="delivery of the accepted messages after the restart")
    except peers.PeerError:
        missing = accepted - set(delivered_ids())
        pytest.fail(f"{len(missing)} messages got 250 and were not delivered within 30 s of the restart, "
                    f"e.g. {sorted(missing)[:3]}; the queue says:\n"
                    f"{g.cli('queue', 'list', check=False).stdout[-3000:]}", pytrace=False)

    # the restarted server works: one more message goes through
    with smtplib.SMTP(*g.address(), timeout=15) as client:
        client.sendmail("crash@client.test", ["alice@example.test"],
                        b"Subject: after the crash\r\nMessage-ID: <after-crash@client.test>\r\n\r\nok\r\n")
    peers.wait_for(lambda: "<after-crash@client.test>" in delivered_ids(), 30, "the post-restart message")
    if g.cli("queue", "list", "--json", check=False).returncode == 0:
        peers.wait_for(lambda: g.cli("queue", "list", "--json").stdout.strip() == "[]", 30, "an empty queue")

    seen = delivered_ids()
    missing = accepted - set(seen)
    assert not missing, f"{len(missing)} messages got 250 and were lost, e.g. {sorted(missing)[:3]}"
    leaked = refused & set(seen)
    assert not leaked, f"{len(leaked)} refused messages were delivered, e.g. {sorted(leaked)[:3]}"
    twice = {m: n for m, n in seen.items() if n > 2}
    assert not twice, f"delivered more than twice: {twice}"
    duplicates = sum(1 for m in accepted | unknown if seen[m] == 2)
    print(f"accepted {len(accepted)}, refused {len(refused)}, cut off {len(unknown)} "
          f"(delivered {sum(1 for m in unknown if seen[m])}), delivered twice {duplicates}")
