"""dnsmasq (``DnsServer``) on 127.0.0.53, answering from records given as Python data.

With NXDOMAIN, NODATA and SERVFAIL on demand (``_ServfailResponder``). It must
never read the system's DNS configuration (/etc/resolv.conf, /etc/hosts,
/etc/dnsmasq.conf) nor forward a query anywhere but to its own SERVFAIL responder.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from .base import PeerError, need, wait_port
from .processes import _terminate, spawn_logged

DNS_HOST = "127.0.0.53"  # DnsServer's loopback address (not a systemd-resolved stub: the port is ours)

# name → {rdtype: [values]}; see DnsServer for the value of each type
DnsRecords = Mapping[str, Mapping[str, Sequence[Any]]]


def free_udp_tcp_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (a DNS server listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise PeerError(f"no port free for both TCP and UDP on {host}")


def _dns_quote(text: str) -> str:
    """A dnsmasq config-file string: quoted, with backslash escapes (commas and '#' stay literal)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class _ServfailResponder:
    """A UDP "nameserver" that answers SERVFAIL to everything; dnsmasq forwards the
    ``servfail`` domains to it and passes the SERVFAIL on. (dnsmasq itself never
    says SERVFAIL outside DNSSEC: an unreachable upstream is REFUSED, a silent one
    no answer at all.)"""

    def __init__(self, host: str) -> None:
        import threading

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.answered = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"servfail-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.exception
        import dns.message
        import dns.rcode

        while not self._stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
                response = dns.message.make_response(dns.message.from_wire(data))
            except (TimeoutError, dns.exception.DNSException):
                continue
            except OSError:
                return
            response.set_rcode(dns.rcode.SERVFAIL)
            with contextlib.suppress(OSError):
                self.sock.sendto(response.to_wire(), peer)
                self.answered += 1

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()


class DnsServer:
    """dnsmasq on its own loopback address, answering from records given as Python data.

    ``records`` maps a name to ``{rdtype: [values]}``::

        {"example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
                          "TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
         "mx1.example.test": {"A": ["127.0.0.10"], "AAAA": ["::10"]},
         "nullmx.test": {"MX": [(0, ".")]},                       # RFC 7505 null MX
         "10.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]}}

    Values: MX ``(preference, host)`` (host ``"."`` is the null MX, served as a
    raw RR); A/AAAA an address (``--host-record``, which also answers the
    PTR for that address); TXT a string (one character-string, split by
    dnsmasq into 255-byte pieces) or a sequence of strings (one record with
    those strings); PTR and CNAME a name (a CNAME target must itself be local
    data); any other type the RR's text form (``"10 5 25 mx.example.test"``
    for SRV), served as a raw RR through dnspython's wire form. Every record
    has TTL ``ttl``. Names under ``.test``, ``.arpa`` and the top-level domain
    of any record are local: a name there without data is NXDOMAIN, and a name
    with data but not of the asked type is NODATA. Other names are REFUSED.
    Names in ``servfail`` (and their subdomains) get SERVFAIL, from
    ``_ServfailResponder`` via dnsmasq's forwarding.

    dnsmasq runs in the foreground as root (it drops nothing), reads only its
    own ``workdir/dnsmasq.conf`` (never /etc/dnsmasq.conf, /etc/hosts or
    /etc/resolv.conf), keeps no cache (every answer is fresh, so a restart
    with new records takes effect at once), and logs every query to
    ``workdir/dnsmasq.log`` (``queries()`` reads them back). ``update()`` and
    ``set_records()`` rewrite the config and restart it on the same port, so a
    Resolver pointed at ``nameserver`` keeps working.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        address: str = DNS_HOST,
        records: DnsRecords | None = None,
        servfail: Sequence[str] = (),
        ttl: int = 300,
        start: bool = True,
        port: int | None = None,
    ) -> None:
        self.program = need("dnsmasq")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = address
        # port=53 serves programs that only read /etc/resolv.conf (tests/interop/test_dkim_sign.py)
        self.port = port or free_udp_tcp_port(address)
        self.ttl = ttl
        self.records: dict[str, dict[str, list[Any]]] = {}
        self.servfail = tuple(servfail)
        self._set(records or {})
        self.conf_path = self.workdir / "dnsmasq.conf"
        self.log_path = self.workdir / "dnsmasq.log"
        self.out_path = self.workdir / "dnsmasq.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self._servfail: _ServfailResponder | None = None
        if start:
            self.start()

    @property
    def nameserver(self) -> str:
        """For Resolver(nameservers=[...]) and ``[dns] nameservers``: ``127.0.0.53:PORT``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _set(self, records: DnsRecords) -> None:
        self.records = {}
        self._merge(records)

    def _merge(self, records: DnsRecords) -> None:
        for name, by_type in records.items():
            entry = self.records.setdefault(name.rstrip(".").lower(), {})
            for rdtype, values in by_type.items():
                entry[rdtype.upper()] = list(values)

    def config_text(self) -> str:
        lines = [
            "no-resolv",
            "no-hosts",
            "no-poll",
            "bind-interfaces",
            f"listen-address={self.host}",
            f"port={self.port}",
            "user=root",
            "group=root",
            "pid-file=",
            "cache-size=0",
            f"local-ttl={self.ttl}",
            "log-queries",
            f"log-facility={self.log_path}",
        ]
        zones = {"test", "arpa"} | {name.rsplit(".", 1)[-1] for name in self.records}
        lines += [f"local=/{zone}/" for zone in sorted(zones)]
        if self._servfail is not None:
            upstream = f"[{self.host}]" if ":" in self.host else self.host
            lines += [f"server=/{d.rstrip('.')}/{upstream}#{self._servfail.port}" for d in self.servfail]
        for name, by_type in self.records.items():
            for rdtype, values in by_type.items():
                lines += [self._record_line(name, rdtype, value) for value in values]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _record_line(name: str, rdtype: str, value: Any) -> str:
        import dns.name
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype

        if rdtype in ("A", "AAAA"):
            return f"host-record={name},{value}"
        if rdtype == "MX" and str(value[1]).rstrip(".") != "":
            return f"mx-host={name},{str(value[1]).rstrip('.')},{int(value[0])}"
        if rdtype == "TXT":
            strings = [value] if isinstance(value, str) else list(value)
            return f"txt-record={name}," + ",".join(_dns_quote(s) for s in strings)
        if rdtype == "PTR":
            return f"ptr-record={name},{str(value).rstrip('.')}"
        if rdtype == "CNAME":
            return f"cname={name},{str(value).rstrip('.')}"
        text = f"{value[0]} {value[1]}" if rdtype == "MX" else str(value)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text, origin=dns.name.root, relativize=False
        )
        return f"dns-rr={name},{int(rdata.rdtype)},{cast(bytes, rdata.to_wire()).hex()}"

    def start(self) -> None:
        if self.servfail and self._servfail is None:
            self._servfail = _ServfailResponder(self.host)
        self.conf_path.write_text(self.config_text())
        self.proc = spawn_logged(
            [self.program, "--keep-in-foreground", f"--conf-file={self.conf_path}"], self.out_path
        )
        try:
            wait_port(self.host, self.port, 10, proc=self.proc, what="dnsmasq")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- dnsmasq.out ---\n{self.log_text()[-3000:]}") from None

    def set_records(self, records: DnsRecords, *, servfail: Sequence[str] | None = None) -> None:
        """Replace every record (and the SERVFAIL domains, if given); restart if running."""
        self._set(records)
        if servfail is not None:
            self.servfail = tuple(servfail)
        self._restart_if_running()

    def update(self, records: DnsRecords) -> None:
        """Add records: each (name, type) given replaces that name's records of that type."""
        self._merge(records)
        self._restart_if_running()

    def _restart_if_running(self) -> None:
        if self.proc is not None:
            self._stop_dnsmasq()
            self.start()

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query dnsmasq logged so far, in order."""
        return re.findall(r"query\[(\w+)\] (\S+) from ", self.log_text())

    def log_text(self) -> str:
        text = ""
        for path in (self.out_path, self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text

    def _stop_dnsmasq(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 5)
            self.proc = None

    def stop(self) -> None:
        self._stop_dnsmasq()
        if self._servfail is not None:
            self._servfail.stop()
            self._servfail = None

    close = stop

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
