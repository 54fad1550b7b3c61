"""Outbound TLS policy, Gannet to Gannet: the receiving Gannet offers STARTTLS
with a trustme certificate for mx.example.test, localhost and 127.0.0.1.

- opportunistic (`may`, the default): STARTTLS whenever offered; the log says TLSv1.x;
- `verify` with the CA: delivered when the MX name is in the certificate,
  deferred (never sent in clear) when it is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peers
import pytest

from interop.test_relay import Relay

pytestmark = pytest.mark.interop


def receiver_and_records(gannet: Callable[..., peers.GannetProcess], mx_name: str
                         ) -> tuple[peers.GannetProcess, int, dict[str, dict[str, list[Any]]]]:
    receiver = gannet(hostname="mx.b.test", relay={"local_domains": ["example.test", "b.test"]},
                      users={"bob@b.test": "pw"})
    port = receiver.address("mx")[1]
    records: dict[str, dict[str, list[Any]]] = {"b.test": {"MX": [(10, mx_name)]}}
    if mx_name != "localhost":
        records[mx_name] = {"A": [peers.GANNET_HOST]}
    return receiver, port, records


@pytest.mark.parametrize(("policy", "mx_name", "delivered"), [
    ("may", "mx.b.test", True),
    ("verify", "localhost", True),
    ("verify", "mx.b.test", False),
])
def test_outbound_starttls(policy: str, mx_name: str, delivered: bool, tls_certs: peers.TlsCerts,
                           gannet: Callable[..., peers.GannetProcess],
                           dns_server: Callable[..., peers.DnsServer]) -> None:
    receiver, port, records = receiver_and_records(gannet, mx_name)
    if mx_name == "localhost":
        records["localhost"] = {"A": [peers.GANNET_HOST]}
    dns = dns_server(records=records)
    relay = Relay(gannet, dns, port, tls=policy, tls_ca_file=str(tls_certs.ca_file))
    relay.send("bob@b.test")
    if delivered:
        peers.wait_for(lambda: receiver.delivered("bob@b.test") or None, 30, "delivery to the receiver")
        # The receiver writes its Maildir file before its 250 (local_direct): the
        # relay's line may come a moment after the file.
        (line,) = peers.wait_for(lambda: [ln for ln in relay.log_lines("to=<bob@b.test>")
                                          if "status=sent" in ln], 30, "the relay's sent line")
        assert "tls=TLSv1." in line, line
        received = peers.read_headers(receiver.delivered("bob@b.test")[0]).get_all("Received")[0]
        assert "ESMTPS" in str(received), received
    else:
        lines = peers.wait_for(lambda: [ln for ln in relay.log_lines("to=<bob@b.test>")
                                        if "status=deferred" in ln], 30, "a deferral")
        assert "certificate" in lines[0].lower() or "verif" in lines[0].lower(), lines[0]
        assert not receiver.delivered("bob@b.test")
