"""The mail-log line of one recipient attempt, whoever made it (Maildir, LMTP,
SMTP, the sweep): `QUEUEID: to=<…>, relay=…, delay=…, tls=…, dsn=…, status=…
(reason)`. The dsn= field is the enhanced status code in the reason, or the
class default. The same place counts the attempt for /metrics. Never raises
(maillog and metrics never do).
"""

from __future__ import annotations

from gannet import maillog, metrics
from gannet.delivery.attempts import status_of
from gannet.queue.model import Deferred, Delivered, Outcome


def log_outcome(
    queue_id: str, address: str, outcome: Outcome, *, relay: str, delay: float, now: float, tls: str = ""
) -> None:
    if isinstance(outcome, Delivered):
        dsn = status_of(outcome.detail, "2.0.0")
        maillog.delivered(queue_id, address, relay, delay, outcome.detail, dsn=dsn, tls=tls)
        metrics.delivery_outcome(address, "delivered", delay)
    elif isinstance(outcome, Deferred):
        dsn = status_of(outcome.reason, "4.0.0")
        retry_in = outcome.retry_at - now
        maillog.deferred(queue_id, address, relay, delay, outcome.reason, dsn=dsn, retry_in=retry_in, tls=tls)
        metrics.delivery_outcome(address, "deferred", delay)
    else:
        maillog.bounced(
            queue_id, address, relay, delay, outcome.reason, dsn=status_of(outcome.reason, "5.0.0"), tls=tls
        )
        metrics.delivery_outcome(address, "bounced", delay)
