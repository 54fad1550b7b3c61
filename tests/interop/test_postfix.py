"""Postfix as the sending MTA: a real Postfix relays mail to Gannet.

A private Postfix on 127.0.0.2 takes 200 messages from smtp-source and relays
everything to Gannet (``relayhost = [127.0.0.1]:PORT``, its SMTP client bound
to 127.0.0.2, so Gannet sees another host). Postfix's client speaks ESMTP with
PIPELINING and 8BITMIME and reuses connections; every message must arrive
once, Postfix's queue must empty (no deferral: Postfix would log why), and
Gannet's Received header must name the Postfix host.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import peers
import pytest

pytestmark = pytest.mark.interop

MESSAGES = 200


def test_postfix_relays_to_gannet(gannet: Callable[..., peers.GannetProcess],
                                  postfix: Callable[..., peers.PostfixInstance]) -> None:
    peers.need("smtp-source")
    g = gannet()
    pf = postfix(mode="relay", relayhost=g.target(), hostname="relay.postfix.test")
    peers.smtp_source(pf.target, messages=MESSAGES, sessions=5, size=2048, sender="from@postfix.test",
                      recipient="bob@example.test", helo="client.postfix.test")
    try:
        peers.wait_progress(lambda: len(g.delivered("bob@example.test")), MESSAGES, stall=30,
                            what="Postfix → Gannet deliveries")
        pf.wait_queue_empty(30)
    except peers.PeerError as exc:
        deferred = [line for line in pf.log_text().splitlines() if "status=deferred" in line][-5:]
        pytest.fail(f"{exc}\nPostfix deferrals:\n" + "\n".join(deferred), pytrace=False)
    files = g.delivered("bob@example.test")
    ids = Counter(peers.message_ids(files))
    assert len(files) == MESSAGES and len(ids) == MESSAGES, "a message was lost or delivered twice"
    received = peers.read_headers(files[0]).get_all("Received")
    assert re.search(r"from relay\.postfix\.test \(.*\[127\.0\.0\.2\]", received[0]), received[0]
    sent = [line for line in pf.log_text().splitlines() if "status=sent" in line]
    assert len(sent) == MESSAGES and all("relay=127.0.0.1[127.0.0.1]" in line for line in sent), sent[:2]
