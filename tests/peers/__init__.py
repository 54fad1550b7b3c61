"""Real peers: the one package that starts the programs Gannet is tested against.

Used by tests/integration, tests/interop (through the fixtures in
tests/conftest.py) and by bench/ (imported directly), always as ``import peers``
(tests/ is on sys.path): every name below is reachable as ``peers.NAME``.
One module per peer or helper:

- ``base``: loopback addresses, test accounts, ``PeerError``, ``need``/``in_ci``,
  free ports and polling waits; ``processes``: /proc CPU and RSS figures,
  children, stopping; ``files``: Maildir messages, TOML configs, TLS certificates;
  ``private_root``: directories a daemon's unprivileged users can reach;
- ``gannet``: Gannet itself (``GannetProcess`` runs ``python -m gannet serve
  --config F``; ``gannet_cli`` its other sub-commands);
- ``postfix``: a private Postfix (``PostfixInstance``) with its own config, queue
  and data directories, delivering into Maildirs with virtual(8), relaying
  everything to one host, or accepting and holding or discarding;
- ``sinks``: Postfix's smtp-sink (``SmtpSink``, counting, optionally dumping) and
  a TCP server that never greets (``BlackHole``), for greeting timeouts;
- ``mailtools``: smtp-source (``smtp_source``), ``swaks``, ``opendkim_sign``;
- ``dovecot``: a private Dovecot (``DovecotImap``) reading a Maildir tree over
  IMAP, and taking LMTP (over TCP or its unix socket), optionally checking SASL
  AUTH for Postfix (``auth_socket=True``, ``postfix_sasl_settings``);
- ``postgres``: a private PostgreSQL (``PostgresServer``) from its binaries;
- ``dnsmasq``: ``DnsServer`` serving MX/A/AAAA/TXT/PTR records given as Python
  data, with NXDOMAIN and SERVFAIL on demand;
- ``haproxy``: ``HAProxy`` in TCP mode on 127.0.0.8 in front of Gannet nodes,
  with ``send-proxy`` / ``send-proxy-v2`` and health checks.

Rules every module here keeps:

- Loopback only, one address per fake host: Gannet 127.0.0.1, Postfix
  127.0.0.2, smtp-sink 127.0.0.3, Dovecot 127.0.0.4, dnsmasq 127.0.0.53 (127.0.0.0/8 is all
  loopback on Linux). Ports come from ``free_port`` on that address; none is
  fixed.
- Every wait polls a condition with a deadline; nothing sleeps blindly and
  nothing waits forever.
- Whoever starts a process stops it: every class is a context manager with an
  idempotent ``stop()``/``close()``, and the fixtures finalize them.
- A missing program is a skip with the reason (which Debian package to
  install), except when ``CI=true``, where it is a failure: the CI machine must
  run every interop test (``.ci/run`` installs the packages).
- Helpers never import peer modules (no cycles); this file only re-exports.

Privileges (the suite runs as root on the CI machine) are explained in
``private_root``; Postfix's durability defaults in ``postfix``.
"""

# The former single-file tests/peers.py exposed its imports too; tests annotate with peers.subprocess.
import subprocess as subprocess

from .base import (
    DOVECOT_HOST,
    GANNET_HOST,
    PACKAGES,
    POSTFIX_HOST,
    REPO,
    SEARCH_DIRS,
    SINK_HOST,
    USERS,
    PeerError,
    find_program,
    free_port,
    in_ci,
    need,
    port_open,
    split_address,
    wait_for,
    wait_port,
    wait_progress,
)
from .dnsmasq import DNS_HOST, DnsRecords, DnsServer, _dns_quote, _ServfailResponder, free_udp_tcp_port
from .dovecot import DOVECOT_CONF, DovecotImap
from .files import (
    TlsCerts,
    _bare,
    _is_table_array,
    deep_merge,
    maildir_files,
    make_tls_certs,
    message_ids,
    read_headers,
    to_toml,
    toml_value,
)
from .gannet import GannetProcess, Listener, _gannet_env, gannet_cli
from .haproxy import HAPROXY_CFG, HAPROXY_HOST, HAProxy
from .mailtools import SourceResult, opendkim_sign, smtp_source, swaks
from .postfix import POSTFIX_MASTER_CF, QUEUE_DIRS, PostfixInstance, PostfixMode, postfix_sasl_settings
from .postgres import POSTGRES_HOST, POSTGRES_USER, PostgresServer, postgres_bin
from .private_root import _PrivateRoot, _world_searchable
from .processes import (
    _TICK,
    _alive,
    _kill_pids,
    _proc_stat,
    _terminate,
    alive,
    child_pids,
    descendant_pids,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    raise_nofile,
    rss_kib,
    status_kib,
    tree_rss_kib,
)
from .sinks import BlackHole, SmtpSink

# Every name the former single-file tests/peers.py defined, private ones included (tests use some).
__all__ = [
    # base
    "DOVECOT_HOST",
    "GANNET_HOST",
    "PACKAGES",
    "POSTFIX_HOST",
    "REPO",
    "SEARCH_DIRS",
    "SINK_HOST",
    "USERS",
    "PeerError",
    "find_program",
    "free_port",
    "in_ci",
    "need",
    "port_open",
    "split_address",
    "wait_for",
    "wait_port",
    "wait_progress",
    # dnsmasq
    "DNS_HOST",
    "DnsRecords",
    "DnsServer",
    "_dns_quote",
    "_ServfailResponder",
    "free_udp_tcp_port",
    # dovecot
    "DOVECOT_CONF",
    "DovecotImap",
    # files
    "TlsCerts",
    "_bare",
    "_is_table_array",
    "deep_merge",
    "maildir_files",
    "make_tls_certs",
    "message_ids",
    "read_headers",
    "to_toml",
    "toml_value",
    # gannet
    "GannetProcess",
    "Listener",
    "_gannet_env",
    "gannet_cli",
    # haproxy
    "HAPROXY_CFG",
    "HAPROXY_HOST",
    "HAProxy",
    # mailtools
    "SourceResult",
    "opendkim_sign",
    "smtp_source",
    "swaks",
    # postfix
    "POSTFIX_MASTER_CF",
    "QUEUE_DIRS",
    "PostfixInstance",
    "PostfixMode",
    "postfix_sasl_settings",
    # postgres
    "POSTGRES_HOST",
    "POSTGRES_USER",
    "PostgresServer",
    "postgres_bin",
    # private_root
    "_PrivateRoot",
    "_world_searchable",
    # processes
    "_TICK",
    "_alive",
    "_kill_pids",
    "_proc_stat",
    "_terminate",
    "alive",
    "child_pids",
    "descendant_pids",
    "process_cpu_seconds",
    "process_tree_cpu_seconds",
    "raise_nofile",
    "rss_kib",
    "status_kib",
    "tree_rss_kib",
    # sinks
    "BlackHole",
    "SmtpSink",
]
