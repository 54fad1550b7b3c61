"""A private Dovecot (``DovecotImap``) on 127.0.0.4: IMAP over a Maildir tree, optionally LMTP and SASL.

Dovecot never reads mail as root, so its mail processes run as ``nobody`` and
the Maildirs it serves are handed to that user (``grant_access``). It must never
read /etc/dovecot or share a base_dir with a system Dovecot: its config, sockets
and state live in a private root under /tmp.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from .base import DOVECOT_HOST, PeerError, free_port, need, split_address, wait_for, wait_port
from .private_root import _PrivateRoot
from .processes import _alive, _kill_pids, _terminate, descendant_pids, spawn_logged

DOVECOT_CONF = """\
# written by tests/peers/dovecot.py DovecotImap
base_dir = {run}
state_dir = {state}
instance_name = gannet-test-dovecot
log_path = {log}
info_log_path = {log}
protocols = {protocols}
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Dovecot never reads mail as root ("Mail access not allowed for root"), so mail
# processes run as {mail_user}, chrooted into the Maildir root (the chroot is
# entered as root, so the root's ancestors need not be searchable by
# {mail_user}); index and control files stay in the Maildirs (default).
first_valid_uid = 1
mail_uid = {mail_user}
mail_gid = {mail_group}
mail_chroot = {maildir_root}
valid_chroot_dirs = {maildir_root}
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = home=/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
{lmtp_listener}}}
protocol lmtp {{
  # lmtp serves many users in one process and does not chroot: absolute paths,
  # so the Maildir root's ancestors must be searchable by the mail user.
  mail_chroot =
  mail_location = maildir:{maildir_root}/%d/%n
  postmaster_address = postmaster@example.test
}}
"""


class DovecotImap:
    """A private Dovecot serving the Maildirs under ``maildir_root`` (``ROOT/DOMAIN/USER``) over IMAP.

    ``users`` maps full addresses to plain-text passwords (passwd-file with
    ``{PLAIN}``). Dovecot refuses to touch mail as root, and Gannet runs as
    root in the tests, so mail processes run as ``mail_user`` (default
    ``nobody``) chrooted into ``maildir_root``, and ``start()`` hands the tree
    under ``maildir_root`` to that user (``chown -R``; call ``grant_access()``
    again after Gannet delivered more while Dovecot runs). A real deployment
    does the same by running Gannet and Dovecot as one mail user.
    Dovecot keeps its index, control and uidlist files in the Maildirs (its
    default), beside new/ cur/ tmp/; IMAP SELECT moves messages from new/ to
    cur/. ``lmtp=True`` adds an LMTP listener on the same address
    (``lmtp_port``), delivering into the same Maildirs; LMTP does not chroot,
    so give it a ``maildir_root`` the mail user can reach, or none (then
    ``workdir/dovecot/mail``, which it can). Run as
    ``dovecot -c CONF -F`` in the background; ``stop()`` sends SIGTERM to
    that master and waits for its children.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str],
        maildir_root: Path | None = None,
        listen: str | None = None,
        lmtp: bool = False,
        lmtp_listen: str | None = None,
        mail_user: str = "nobody",
        auth_socket: bool = False,
        start: bool = True,
        startup_timeout: float = 20.0,
    ) -> None:
        self.program = need("dovecot")
        self.workdir = Path(workdir)
        self.mail_user = pwd.getpwnam(mail_user)
        if listen is None:
            listen = f"{DOVECOT_HOST}:{free_port(DOVECOT_HOST)}"
        self.host, self.imap_port = split_address(listen)
        self.lmtp_port: int | None = None
        if lmtp or lmtp_listen:
            lmtp_host, self.lmtp_port = split_address(lmtp_listen or f"{self.host}:{free_port(self.host)}")
            if lmtp_host != self.host:
                raise ValueError("DovecotImap: LMTP listens on the IMAP address (one host, one address)")
        self.startup_timeout = startup_timeout
        # Always a short private root: Dovecot's sockets live under base_dir (108-byte limit).
        self.root = _PrivateRoot(self.workdir, "dovecot", force_tmp=True)
        base = self.root.path
        self.maildir_root = Path(maildir_root) if maildir_root else base / "mail"
        self.log_path = base / "dovecot.log"
        self.passwd_path = base / "passwd"
        for sub in ("run", "state"):
            (base / sub).mkdir()
        self.passwd_path.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
        self.passwd_path.chmod(0o640)
        shutil.chown(self.passwd_path, group="dovecot")
        protocols = "imap lmtp" if self.lmtp_port else "imap"
        lmtp_listener = ""
        if self.lmtp_port:
            lmtp_listener = (
                f"  inet_listener lmtp {{\n    address = {self.host}\n    port = {self.lmtp_port}\n  }}\n"
            )
        self.config_path = base / "dovecot.conf"
        self.config_path.write_text(
            DOVECOT_CONF.format(
                run=base / "run",
                state=base / "state",
                log=self.log_path,
                protocols=protocols,
                host=self.host,
                maildir_root=self.maildir_root,
                passwd=self.passwd_path,
                mail_user=self.mail_user.pw_uid,
                mail_group=self.mail_user.pw_gid,
                imap_port=self.imap_port,
                lmtp_listener=lmtp_listener,
            )
        )
        # auth_socket=True: a SASL socket anyone may use, for Postfix's smtpd_sasl_type = dovecot
        # (see postfix_sasl_settings); it checks the same passwd-file as IMAP.
        self.auth_socket: Path | None = None
        if auth_socket:
            self.auth_socket = base / "run" / "auth-postfix"
            with open(self.config_path, "a") as conf:
                conf.write("service auth {\n  unix_listener auth-postfix {\n    mode = 0666\n  }\n}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def grant_access(self) -> None:
        """Give everything under ``maildir_root`` to the mail user (Dovecot reads and moves files)."""
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        self.maildir_root.mkdir(parents=True, exist_ok=True)
        os.chown(self.maildir_root, uid, gid)
        for dirpath, dirnames, filenames in os.walk(self.maildir_root):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

    def start(self) -> None:
        self.grant_access()
        out = self.root.path / "dovecot.out"
        self.proc = spawn_logged([self.program, "-c", str(self.config_path), "-F"], out)
        try:
            for port, what in ((self.imap_port, "imap"), (self.lmtp_port, "lmtp")):
                if port:
                    wait_port(self.host, port, self.startup_timeout, proc=self.proc, what=f"dovecot {what}")
            if self.auth_socket is not None:
                socket_path = self.auth_socket
                wait_for(socket_path.exists, self.startup_timeout, f"dovecot auth socket {socket_path}")
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{exc}\n--- dovecot.log ---\n{self.log_text()[-3000:]}") from None

    @property
    def imap_address(self) -> tuple[str, int]:
        return self.host, self.imap_port

    @property
    def lmtp_address(self) -> tuple[str, int]:
        if self.lmtp_port is None:
            raise PeerError("DovecotImap was started without lmtp=True")
        return self.host, self.lmtp_port

    @property
    def lmtp_socket(self) -> Path:
        """The LMTP unix socket (a ``unix:`` destination): root's, mode 0600 (the suite is root)."""
        if self.lmtp_port is None:
            raise PeerError("DovecotImap was started without lmtp=True")
        return self.root.path / "run" / "lmtp"

    def log_text(self) -> str:
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            with contextlib.suppress(OSError):
                text += (self.root.path / name).read_text(errors="replace")
        return text

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        pids = descendant_pids(self.proc.pid) if self.proc.poll() is None else []
        _terminate(self.proc, timeout)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_pids(p for p in pids if _alive(p))
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.root.remove(keep=("dovecot.log",))

    def __enter__(self) -> DovecotImap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
