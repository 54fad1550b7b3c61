"""A private Postfix (``PostfixInstance``): own config, queue and data directories, on 127.0.0.2.

It delivers into Maildirs with virtual(8), relays everything to one host, or
accepts and holds or discards; ``postfix_sasl_settings`` adds SASL AUTH checked by
a private Dovecot. It must never touch the system's Postfix (/etc/postfix, the
system queue) and never listens outside loopback.

Durability, for comparisons with Gannet's "250 only after fsync": Postfix is left
at its defaults, which fsync the queue file before smtpd answers 250 (cleanup(8))
and fsync each Maildir file before virtual(8) reports success; nothing here turns
that off.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from .base import POSTFIX_HOST, PeerError, free_port, need, split_address, wait_for, wait_port
from .files import maildir_files
from .private_root import _PrivateRoot
from .processes import _alive, _kill_pids, descendant_pids, process_tree_cpu_seconds

POSTFIX_MASTER_CF = """\
# service    type  private unpriv chroot wakeup maxproc command
{listen}      inet  n       -      n      -      -       smtpd
pickup       unix  n       -      n      60     1       pickup
cleanup      unix  n       -      n      -      0       cleanup
qmgr         unix  n       -      n      300    1       qmgr
tlsmgr       unix  -       -      n      1000?  1       tlsmgr
rewrite      unix  -       -      n      -      -       trivial-rewrite
bounce       unix  -       -      n      -      0       bounce
defer        unix  -       -      n      -      0       bounce
trace        unix  -       -      n      -      0       bounce
verify       unix  -       -      n      -      1       verify
flush        unix  n       -      n      1000?  0       flush
proxymap     unix  -       -      n      -      -       proxymap
proxywrite   unix  -       -      n      -      1       proxymap
smtp         unix  -       -      n      -      -       smtp
relay        unix  -       -      n      -      -       smtp
showq        unix  n       -      n      -      -       showq
error        unix  -       -      n      -      -       error
retry        unix  -       -      n      -      -       error
discard      unix  -       -      n      -      -       discard
local        unix  -       n      n      -      -       local
virtual      unix  -       n      n      -      -       virtual
lmtp         unix  -       -      n      -      -       lmtp
anvil        unix  -       -      n      -      1       anvil
scache       unix  -       -      n      -      1       scache
postlog      unix-dgram n  -      n      -      1       postlogd
"""

PostfixMode = Literal["maildir", "relay", "hold", "discard"]
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixInstance:
    """A private Postfix: own config_directory, queue_directory and data_directory.

    ``mode``:
      - ``"maildir"``: mail for ``domains`` is delivered by virtual(8) into
        ``maildir_root/DOMAIN/USER/`` (Gannet's layout) for each address in
        ``mailboxes``; the mailboxes are owned by ``nobody`` (virtual(8) refuses
        uid 0), everything else bounces;
      - ``"relay"``: everything is sent with smtp(8) to ``relayhost``
        (``"127.0.0.1:2525"``), from the instance's own address;
      - ``"hold"``: accepted and put on hold (``postqueue -p`` shows it);
      - ``"discard"``: accepted and thrown away.
    ``settings`` adds or overrides main.cf parameters. smtpd listens only on
    ``listen``; ``inet_interfaces = loopback-only`` (Postfix insists that its
    interfaces be configured addresses, and 127.0.0.2 is not one).
    Logs go to ``postfix.log`` through postlogd (``maillog_file``), not syslog.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        listen: str | None = None,
        mode: PostfixMode = "maildir",
        hostname: str = "postfix.test",
        mydomain: str = "postfix.test",
        domains: Sequence[str] = ("example.test",),
        mailboxes: Sequence[str] = ("alice@example.test", "bob@example.test"),
        maildir_root: Path | None = None,
        relayhost: str | None = None,
        process_limit: int = 100,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
        startup_timeout: float = 30.0,
    ) -> None:
        self.postfix = need("postfix")
        self.postconf = need("postconf")
        self.workdir = Path(workdir)
        if listen is None:
            listen = f"{POSTFIX_HOST}:{free_port(POSTFIX_HOST)}"
        self.host, self.port = split_address(listen)
        self.mode = mode
        self.startup_timeout = startup_timeout
        self.root = _PrivateRoot(self.workdir, "postfix")
        base = self.root.path
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        self.log_path = base / "postfix.log"
        self.maildir_root = Path(maildir_root) if maildir_root else base / "mail"
        self.mailboxes = tuple(mailboxes)
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        self.log_path.touch()
        shutil.chown(self.log_path, "postfix")
        params = self._main_cf(hostname, mydomain, domains, relayhost, process_limit)
        params.update(settings or {})
        (self.config_dir / "main.cf").write_text(
            "# written by tests/peers/postfix.py PostfixInstance\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items())
        )
        (self.config_dir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(listen=f"{self.host}:{self.port}")
        )
        self.started = False
        if start:
            self.start()

    def _main_cf(
        self, hostname: str, mydomain: str, domains: Sequence[str], relayhost: str | None, process_limit: int
    ) -> dict[str, str]:
        p = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "import_environment": (
                "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
            ),
            "myhostname": hostname,
            "mydomain": mydomain,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtputf8_enable": "yes",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_path.parent),
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "default_process_limit": str(process_limit),
            # room for bench/large.py's 50 MiB message (defaults: 10 MB and 51.2 MB)
            "message_size_limit": str(100 * 1024 * 1024),
            "virtual_mailbox_limit": "0",
            "mailbox_size_limit": "0",
            "smtp_bind_address": self.host,
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
        }
        if self.mode == "maildir":
            mailbox_map = ", ".join(
                f"{a}={a.rpartition('@')[2]}/{a.rpartition('@')[0]}/" for a in self.mailboxes
            )
            pw = pwd.getpwnam("nobody")
            p.update(
                {
                    "virtual_mailbox_domains": ", ".join(domains),
                    "virtual_mailbox_base": str(self.maildir_root),
                    "virtual_mailbox_maps": f"inline:{{ {mailbox_map} }}" if self.mailboxes else "",
                    "virtual_uid_maps": f"static:{pw.pw_uid}",
                    "virtual_gid_maps": f"static:{pw.pw_gid}",
                    "virtual_minimum_uid": "1",
                }
            )
            self.maildir_root.mkdir(parents=True, exist_ok=True)
            os.chown(self.maildir_root, pw.pw_uid, pw.pw_gid)
        elif self.mode == "relay":
            if not relayhost:
                raise ValueError("PostfixInstance(mode='relay') needs relayhost='host:port'")
            host, port = split_address(relayhost)
            p.update({"relayhost": f"[{host}]:{port}", "default_transport": "smtp"})
        elif self.mode == "hold":
            p["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        elif self.mode == "discard":
            p["smtpd_end_of_data_restrictions"] = "check_client_access static:DISCARD"
        else:
            raise ValueError(f"unknown PostfixInstance mode {self.mode!r}")
        return p

    # -- lifecycle
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        result = self._run("start")
        if result.returncode != 0:
            raise PeerError(
                f"postfix -c {self.config_dir} start failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- postfix.log ---\n{self.log_text()[-3000:]}"
            )
        self.started = True
        try:
            wait_port(self.host, self.port, self.startup_timeout, what="postfix smtpd")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- postfix.log ---\n{self.log_text()[-3000:]}") from None

    @property
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def pids(self) -> list[int]:
        """The master and its live descendants."""
        master = self.master_pid
        return [master, *descendant_pids(master)] if master else []

    def cpu_seconds(self) -> float:
        """CPU used so far by the whole instance (see ``process_tree_cpu_seconds``).

        Postfix's master reaps every daemon it starts, so the time of exited
        smtpd, cleanup, virtual … processes is in the master's cutime/cstime.
        """
        master = self.master_pid
        return process_tree_cpu_seconds(master) if master else 0.0

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop``, then wait until the master and every daemon have exited."""
        if not self.started:
            return
        self.started = False
        pids = self.pids()
        self._run("stop")
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        stragglers = [p for p in pids if _alive(p)]
        _kill_pids(stragglers)
        if stragglers:
            raise PeerError(f"postfix -c {self.config_dir} stop left {stragglers}; killed them")

    def close(self) -> None:
        """stop() and remove a temporary root (its log is kept as workdir/postfix.log)."""
        try:
            self.stop()
        finally:
            self.root.remove(keep=("postfix.log",))

    def __enter__(self) -> PostfixInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it has done
    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def queue_files(self) -> list[Path]:
        return [p for d in QUEUE_DIRS for p in (self.queue_dir / d).rglob("*") if p.is_file()]

    def queue_count(self) -> int:
        return len(self.queue_files())

    def wait_queue_empty(self, timeout: float = 60) -> None:
        wait_for(lambda: self.queue_count() == 0, timeout, f"postfix queue {self.queue_dir} to empty")

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        subprocess.run(
            [need("postqueue"), "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=30,
            check=False,
        )

    def maildir(self, address: str) -> Path:
        user, _, domain = address.rpartition("@")
        return self.maildir_root / domain / user

    def delivered(self, address: str | None = None) -> list[Path]:
        return maildir_files(self.maildir(address) if address else self.maildir_root)


def postfix_sasl_settings(auth_socket: Path) -> dict[str, str]:
    """main.cf settings for SASL AUTH in a PostfixInstance, checked by a Dovecot auth socket
    (``DovecotImap(auth_socket=True).auth_socket``): ``PostfixInstance(settings=...)``.
    smtpd then offers ``AUTH PLAIN LOGIN`` (without TLS too: smtpd_tls_auth_only is off)."""
    return {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": str(auth_socket),
    }
