"""Delivery: moving queued recipients to where they are going.

- `local`: delivery into Maildirs (`LocalDelivery`; pure decisions in
  `local_decisions`, the file format in `maildir`);
- `scheduler`: outbound delivery over SMTP (and LMTP) through `outbound`,
  with `destination` (per next hop state), `routing` and `dns` (where mail
  goes), `attempts` (what a result means, pure), `recorder` (group commits);
- `bounces` and `dsn`/`dsn_policy`: delivery status notifications;
- `sweep`: expired and stuck recipients, independent of the delivery loops;
- `retry`: the schedule arithmetic everyone shares;
- `worker`: the process that runs them all beside the SMTP server.

Importing the package has no side effects.
"""

from gannet.delivery.local import DeliveryStats, LocalDelivery
from gannet.delivery.local_decisions import decide_outcome, idle_delay
from gannet.delivery.maildir import deliver_to_maildir, maildir_path
from gannet.delivery.retry import is_expired, next_retry, retry_at

__all__ = [
    "DeliveryStats",
    "LocalDelivery",
    "decide_outcome",
    "deliver_to_maildir",
    "idle_delay",
    "is_expired",
    "maildir_path",
    "next_retry",
    "retry_at",
]
