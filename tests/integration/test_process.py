"""`gannet serve` as a process: signals, reload, and the delivery worker's life.

- SIGHUP re-reads the config; a bad one is refused and the running one kept.
- SIGTERM: stop listening, let a session in the middle of DATA finish, exit 0.
- The delivery worker (a child process) is restarted if it dies, exits when
  its server dies, and a restarted server delivers what was queued.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import smtplib
import socket
import ssl
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers

Gannet = Callable[..., peers.GannetProcess]


def send(server: peers.GannetProcess, subject: str, to: str = "alice@example.test") -> str:
    host, port = server.address("mx")
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.sendmail("x@elsewhere.test", [to], f"Subject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\nhi\r\n")
    return subject


def delivered_subjects(server: peers.GannetProcess, address: str = "alice@example.test") -> set[str]:
    return {peers.read_headers(p)["Subject"] for p in server.delivered(address)}


def wait_subject(server: peers.GannetProcess, subject: str, address: str = "alice@example.test") -> None:
    peers.wait_for(lambda: subject in delivered_subjects(server, address), 15, f"{subject!r} delivered")


def worker_pids(server: peers.GannetProcess) -> list[int]:
    """The server's delivery-worker children (a child may exit while we look)."""
    pids = []
    for pid in peers.child_pids(server.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"deliver-worker" in cmdline:
            pids.append(pid)
    return pids


def test_sighup_refuses_a_bad_config_and_applies_a_good_one(gannet: Gannet) -> None:
    server = gannet()
    good = server.config_path.read_text()
    server.config_path.write_text(good + "\n[smtp]\nmax_errors = 0\n")
    os.kill(server.pid, signal.SIGHUP)
    peers.wait_for(lambda: "reload refused" in server.log_text(), 10, "the refusal in the log")
    assert "smtp.max_errors" in server.log_text()
    wait_subject(server, send(server, "still-running"))

    changed = good.replace('local_domains = ["example.test"]', 'local_domains = ["example.test", "new.test"]')
    changed = changed.replace(
        '"postmaster@example.test" = ["alice@example.test"]',
        '"postmaster@example.test" = ["alice@example.test"], "info@new.test" = ["alice@example.test"]',
    )
    assert changed != good
    server.config_path.write_text(changed)
    os.kill(server.pid, signal.SIGHUP)
    peers.wait_for(lambda: "reloaded" in server.log_text(), 10, "the reload in the log")
    wait_subject(server, send(server, "to-new-domain", to="info@new.test"))


def test_a_killed_delivery_worker_is_restarted(gannet: Gannet) -> None:
    server = gannet()
    wait_subject(server, send(server, "before"))
    (worker,) = peers.wait_for(lambda: worker_pids(server) or None, 10, "the delivery worker")
    os.kill(worker, signal.SIGKILL)
    peers.wait_for(lambda: (worker_pids(server) or [worker]) != [worker], 15, "a new delivery worker")
    wait_subject(server, send(server, "after"))
    assert "delivery worker" in server.log_text() and "restarting" in server.log_text()


def test_sigterm_lets_a_session_in_data_finish_then_exits_cleanly(gannet: Gannet) -> None:
    server = gannet()
    host, port = server.address("mx")
    busy = socket.create_connection((host, port), timeout=10)
    idle = socket.create_connection((host, port), timeout=10)
    f = busy.makefile("rb")
    f.readline()
    busy.sendall(b"EHLO x\r\n")
    while f.readline()[3:4] == b"-":
        pass
    busy.sendall(b"MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    busy.sendall(b"Subject: in-flight\r\n\r\nfirst half\r\n")
    time.sleep(0.3)
    workers = worker_pids(server)
    server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    idle_file = idle.makefile("rb")
    assert idle_file.readline().startswith(b"220")
    assert idle_file.readline().startswith(b"421 4.3.2"), "an idle session is told to go away"
    time.sleep(0.3)
    busy.sendall(b"second half\r\n.\r\n")
    assert f.readline().startswith(b"250 2.0.0 queued as"), "the message in flight is accepted"
    assert server.proc.wait(30) == 0  # type: ignore[union-attr]
    assert not any(peers._alive(pid) for pid in workers), "the delivery worker stopped with its server"
    server.start()
    wait_subject(server, "in-flight")


def test_worker_exits_when_its_server_is_killed_and_a_restart_delivers_the_queue(gannet: Gannet) -> None:
    """SIGKILL of the server alone: its worker exits, whether it was delivering or
    still waiting for `delivery.lock` (where it does not watch the wake pipe yet:
    the kernel's parent-death signal ends it); nothing queued meanwhile is lost."""
    server = gannet()
    (worker,) = peers.wait_for(lambda: worker_pids(server) or None, 10, "the delivery worker")
    server.kill()
    peers.wait_for(lambda: not peers._alive(worker), 30, "the orphaned worker to exit")
    # A predecessor still finishing its last writes holds the lock (here: this test).
    lock = os.open(server.data_dir / "delivery.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server.start()
        (waiting,) = peers.wait_for(lambda: worker_pids(server) or None, 10, "the next delivery worker")
        peers.wait_for(lambda: "waiting for the previous worker" in server.log_text(since_start=True), 30,
                       "the worker to wait for the lock")
        send(server, "queued-while-the-worker-waited")
        server.kill()
        peers.wait_for(lambda: not peers._alive(waiting), 30, "the worker waiting for the lock to exit")
    finally:
        os.close(lock)
    server.start()
    for i in range(20):
        send(server, f"after-restart-{i}")
    for subject in ["queued-while-the-worker-waited", *(f"after-restart-{i}" for i in range(20))]:
        wait_subject(server, subject)
    assert server.stop() == 0


def _served_certificate(host: str, port: int, ca: peers.TlsCerts, *, implicit: bool) -> bytes:
    """The DER certificate the server presents: on connect (implicit TLS) or after STARTTLS."""
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    context.check_hostname = False
    if implicit:
        with smtplib.SMTP_SSL(host, port, timeout=10, context=context) as s:
            return s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.starttls(context=context)
        return s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]


def test_sighup_puts_a_renewed_certificate_on_every_listener(gannet: Gannet, tmp_path: Path) -> None:
    """A renewed certificate (same paths, new files, as certbot leaves them) is served
    after SIGHUP on the STARTTLS listeners and on the implicit-TLS one (port 465)."""
    cert_dir = tmp_path / "tls"
    first = peers.make_tls_certs(cert_dir)
    server = gannet(tls={"cert": str(first.cert_file), "key": str(first.key_file)})
    before = {m: _served_certificate(*server.address(m), first, implicit=m == "submissions")
              for m in ("mx", "submissions")}  # fmt: skip
    renewed = peers.make_tls_certs(cert_dir)  # a new CA and key, written over the same files
    os.kill(server.pid, signal.SIGHUP)
    peers.wait_for(lambda: "reloaded" in server.log_text(), 10, "the reload in the log")
    for mode in ("mx", "submissions"):
        after = _served_certificate(*server.address(mode), renewed, implicit=mode == "submissions")
        assert after != before[mode], f"{mode}: still the old certificate"


def _rewrite(server: peers.GannetProcess, change: Callable[[dict[str, Any]], None]) -> None:
    config = tomllib.loads(server.config_path.read_text())
    change(config)
    server.config_path.write_text(peers.to_toml(config))


def _reloads(server: peers.GannetProcess, what: str) -> None:
    """SIGHUP, then wait for `what` to be logged once more than before."""
    before = server.log_text().count(what)
    os.kill(server.pid, signal.SIGHUP)
    peers.wait_for(lambda: server.log_text().count(what) > before, 10, f"{what!r} in the log")


def _answers(host: str, port: int) -> bool:
    try:
        with smtplib.SMTP(host, port, timeout=10) as s:
            return s.noop()[0] == 250
    except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
        return False


def test_sighup_applies_listen_changes(gannet: Gannet) -> None:
    server = gannet()
    host, submission_port = server.address("submission")
    in_session = smtplib.SMTP(host, submission_port, timeout=10)  # open across the reload
    in_session.ehlo("client.test")
    new_port = peers.free_port(host)

    def listen(config: dict[str, Any]) -> None:
        config["listen"] = [e for e in config["listen"] if e["mode"] != "submission"]
        config["listen"].append({"address": f"{host}:{new_port}", "mode": "mx"})

    _rewrite(server, listen)
    _reloads(server, "reloaded")
    assert _answers(host, new_port), "the new listener accepts"
    assert not _answers(host, submission_port), "the removed one does not"
    assert in_session.noop()[0] == 250, "a session that came in on it goes on"
    in_session.quit()
    with smtplib.SMTP(host, new_port, timeout=10) as s:  # and it is an mx: mail is accepted
        s.sendmail("x@elsewhere.test", ["alice@example.test"], "Subject: via-new\r\n\r\nhi\r\n")
    wait_subject(server, "via-new")


def test_a_listen_address_in_use_refuses_the_whole_reload(gannet: Gannet) -> None:
    server = gannet(relay={"trusted_networks": ["127.0.0.9/32"]})  # 127.0.0.1 may not relay
    host, port = server.address("mx")
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        busy = taken.getsockname()[1]

        def change(config: dict[str, Any]) -> None:
            config["listen"].append({"address": f"{host}:{busy}", "mode": "mx"})
            config["relay"]["local_domains"].append("new.test")

        _rewrite(server, change)
        _reloads(server, "reload refused")
    assert "[[listen]]" in server.log_text()
    with smtplib.SMTP(host, port, timeout=10) as s:  # the old config, whole: new.test is not ours
        s.ehlo("client.test")
        s.mail("x@elsewhere.test")
        assert s.rcpt("postmaster@new.test")[0] >= 500


def test_sighup_moves_the_admin_server(gannet: Gannet) -> None:
    server = gannet()
    old = tomllib.loads(server.config_path.read_text())["admin"]["address"]
    host = old.rpartition(":")[0]
    new = f"{host}:{peers.free_port(host)}"

    def health(address: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{address}/api/stats", timeout=5) as r:
                return int(r.status)
        except OSError:
            return None

    assert health(old) == 200
    _rewrite(server, lambda config: config["admin"].update(address=new))
    _reloads(server, "reloaded")
    assert health(new) == 200 and health(old) is None


def _sent_by(server: peers.GannetProcess, subject: str) -> int:
    """The PID in the mail log's status=sent line of the message `subject` (send()).
    Waited for: delivered before the 250 ([delivery] local_direct), the file is in
    the Maildir before either process has logged the message."""

    def sender() -> int | None:
        log = server.log_text()
        queued = re.search(rf"gannet\[\d+\]: (\w+): from=.*message-id=<{subject}@t>", log)
        if queued is None:
            return None
        line = rf"gannet\[(\d+)\]: {queued.group(1)}: to=<[^>]+>, relay=maildir, .*status=sent"
        sent = re.search(line, log)
        return int(sent.group(1)) if sent else None

    return int(peers.wait_for(sender, 15, f"{subject!r} logged as queued and sent"))


def _enqueue_writers(server: peers.GannetProcess) -> list[int]:
    return [p for p in peers.child_pids(server.pid) if b"sqlite_enqueue_child" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_the_queue_writer_delivers_local_mail_until_a_reload_turns_it_off(gannet: Gannet) -> None:
    """[delivery] local_at_enqueue (on by default): the enqueue writer process
    writes fresh local mail itself; a reload that turns it off restarts that
    process, and the delivery worker delivers from then on."""
    server = gannet()
    wait_subject(server, send(server, "by-the-writer"))
    (writer,) = _enqueue_writers(server)
    assert _sent_by(server, "by-the-writer") == writer
    ready = server.log_text().count("writer process")
    _rewrite(server, lambda c: c.setdefault("delivery", {}).update(local_at_enqueue=False))
    os.kill(server.pid, signal.SIGHUP)
    peers.wait_for(
        lambda: server.log_text().count("writer process") > ready and writer not in _enqueue_writers(server),
        15, "a new enqueue writer process",
    )  # fmt: skip
    wait_subject(server, send(server, "by-the-worker"))
    assert _sent_by(server, "by-the-worker") in worker_pids(server)
