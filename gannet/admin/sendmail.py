"""`gannet sendmail` (also installed as `gannet-sendmail`, to be linked as
/usr/sbin/sendmail): the command local programs (cron, PHP's mail(), git,
monitoring) hand mail to, with the options they use.

How the mail gets in: over SMTP to the running server's first `mx` listener
(a wildcard address is reached on loopback), where it gets the same checks,
Received header and queue ID as any other mail, and "250" means it is on
disk. Writing into the queue directly (Postfix's postdrop) would need every
local user to have write access to the queue database; over loopback they
need nothing but the right to connect, and the server stays the only writer
of mail. The price: when Gannet is down the program gets EX_TEMPFAIL (75)
and must try again, as it must with any sendmail whose queue is unwritable.
From 127.0.0.1 relaying is allowed only when `[relay] trusted_networks`
includes it (the default does).

Options (sendmail 8 / Postfix compatible):
  -t          recipients from To, Cc, Bcc (added to those on the command line); Bcc is removed
  -f ADDR     envelope sender (also -fADDR, -r ADDR); "<>" is the null sender;
              default: the invoking user @ the first local domain (else the hostname);
              a recipient without a domain gets the same
  -F NAME     full name for the From header added when there is none
  -i, -oi     a line with a single "." does not end the message (without them it does)
  -N DSN      NOTIFY: never, or a list of success, delay, failure; -R full|hdrs; -V ENVID
  -v          show the SMTP dialogue and the queue ID on stderr
  -C FILE, --config FILE   Gannet's config file (else $GANNET_CONFIG, ./gannet.toml, /etc/gannet/gannet.toml)
  --          end of options; everything after is a recipient
Accepted and ignored (they ask for what Gannet does anyway, or for nothing):
  -bm -odb -odi -odq -oem -oee -oep -oeq -oew -om -oo -os -ov -o<anything else> -em -ep -eq -ew -ee
  -U -m -n -B TYPE -L LABEL -O OPT=VAL -X FILE -h HOPS
Refused with a pointer to the right command: -bp (mailq: `gannet queue list`), -q (`gannet queue
retry --all`), -bs -bd -bD -bt -bv -bh -bH; -bi (newaliases) succeeds and does nothing (aliases
live in the config file).

Headers added when missing: From (sender, with -F's name), Date, Message-ID
(RFC 5322 §3.6 requires From and Date; Postfix's cleanup(8) adds the same).
A leading mbox "From " line is dropped; line ends become CRLF.

Exit status (sysexits.h): 0 queued; 64 EX_USAGE bad options or no recipients;
65 EX_DATAERR the server refused the sender or the message; 67 EX_NOUSER a
recipient refused (then nothing is sent to anyone); 75 EX_TEMPFAIL Gannet not
running, or a temporary refusal: try again later; 76 EX_PROTOCOL a reply that
makes no sense; 77 EX_NOPERM relaying refused; 78 EX_CONFIG no usable config.
Must never: print a traceback, or exit 0 unless the server answered 250 to DATA.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import smtplib
import socket
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER = 0, 64, 65, 67
EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM, EX_CONFIG = 75, 76, 77, 78
TIMEOUT = 60.0

_WITH_ARGUMENT = set("fFrNRVCBLOXh")  # single-letter options that take a value
_FLAGS = set("itvUmn")  # flags without a value; U, m, n are accepted and ignored
_REFUSED_MODES = {
    "p": "use `gannet queue list` (mailq)",
    "s": "SMTP on standard input is not supported; connect to Gannet's listener",
    "d": "use `gannet serve`",
    "D": "use `gannet serve`",
    "t": "address test mode is not supported",
    "v": "address verification is not supported",
    "h": "host status is not supported",
    "H": "host status is not supported",
}


class Usage(Exception):
    """Bad command line: EX_USAGE with this text."""


@dataclass(slots=True)
class Options:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False  # -t
    sender: str | None = None
    full_name: str | None = None
    dot_ends: bool = True  # no -i / -oi
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    verbose: bool = False
    config: str | None = None
    newaliases: bool = False


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's option syntax: clustered single letters, values attached or next."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.recipients += args[i:]
            break
        if arg == "--config":
            if i >= len(args):
                raise Usage("--config needs a file")
            opts.config, i = args[i], i + 1
            continue
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        letter, rest = arg[1], arg[2:]
        if letter in _WITH_ARGUMENT:
            if not rest:
                if i >= len(args):
                    raise Usage(f"-{letter} needs a value")
                rest, i = args[i], i + 1
            _set_value(opts, letter, rest)
        elif letter == "o":
            if rest.startswith("i"):  # -oi (also -oi=true style values): dots do not end input
                opts.dot_ends = False
        elif letter == "b":
            _mode(opts, rest)
        elif letter == "q":
            raise Usage("-q: to deliver the queue now, use `gannet queue retry --all`")
        elif letter == "e":
            pass  # -em, -ep …: how to report errors; Gannet's exit status says it
        elif all(flag in _FLAGS for flag in arg[1:]):  # -t, -i, -ti, -v, -U …
            opts.dot_ends = opts.dot_ends and "i" not in arg
            opts.from_headers = opts.from_headers or "t" in arg
            opts.verbose = opts.verbose or "v" in arg
        else:
            raise Usage(f"unknown option {arg} (see `gannet sendmail --help`)")
    return opts


def _set_value(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = "" if value.strip() in ("<>", "") else value.strip().strip("<>")
    elif letter == "F":
        opts.full_name = value
    elif letter == "N":
        words = [w.strip().lower() for w in value.split(",")]
        known = {"never", "success", "delay", "failure"}
        if not set(words) <= known or ("never" in words and len(words) > 1):
            raise Usage(f"-N {value}: give never, or a list of success, delay, failure")
        opts.notify = ",".join(w.upper() for w in words)
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise Usage(f"-R {value}: give full or hdrs")
        opts.ret = value.upper()
    elif letter == "V":
        opts.envid = value
    elif letter == "C":
        opts.config = value
    # B, L, O, X, h: accepted and ignored


def _mode(opts: Options, mode: str) -> None:
    if mode in ("m", ""):
        return
    if mode in ("i", "I"):
        opts.newaliases = True
        return
    hint = _REFUSED_MODES.get(mode[:1], "this mode is not supported")
    raise Usage(f"-b{mode}: {hint}")


# --- the message ------------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")


def read_message(stream: BinaryIO, dot_ends: bool) -> bytes:
    data = stream.read()
    if dot_ends:
        # Classic sendmail: a line with a single "." ends the input (-i turns it off).
        m = re.search(rb"(?m)^\.\r?$", data)
        if m is not None:
            data = data[: m.start()]
    if data.startswith(b"From "):  # an mbox separator, not a header
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return _EOL.sub(b"\r\n", data)


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (each a whole field, folded lines joined with their CRLF) and the body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep and not re.match(rb"[!-9;-~]+:", data):  # no header at all: all body
        return [], data
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields, body


def _name(field_line: bytes) -> str:
    return field_line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _value(field_line: bytes) -> str:
    return field_line.split(b":", 1)[1].decode("utf-8", "replace").replace("\r\n", "")


def prepare(data: bytes, opts: Options, sender: str, target: Target) -> tuple[bytes, list[str]]:
    """The message as sent (Bcc removed, missing headers added) and every recipient
    (a bare user name gets `@origin`, as with Postfix's append_at_myorigin)."""
    fields, body = split_message(data)
    recipients = _addresses(opts.recipients)
    if opts.from_headers:
        recipients += _addresses([_value(f) for f in fields if _name(f) in ("to", "cc", "bcc")])
    recipients = [a if "@" in a else f"{a}@{target.origin}" for a in recipients]
    fields = [f for f in fields if _name(f) != "bcc"]  # RFC 5322 §3.6.3: Bcc is not passed on
    names = {_name(f) for f in fields}
    added: list[str] = []
    if "from" not in names:
        name = opts.full_name if opts.full_name is not None else _gecos()
        added.append("From: " + email.utils.formataddr((name, sender or "MAILER-DAEMON")))
    if "date" not in names:
        added.append("Date: " + email.utils.formatdate(localtime=True))
    if "message-id" not in names:
        added.append("Message-ID: " + email.utils.make_msgid(domain=target.hostname))
    head = b"".join(f + b"\r\n" for f in fields) + "".join(a + "\r\n" for a in added).encode("utf-8")
    return head + b"\r\n" + body, list(dict.fromkeys(recipients))


def _addresses(values: Sequence[str]) -> list[str]:
    return [addr for _name, addr in email.utils.getaddresses(list(values)) if addr]


def _gecos() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]
    except KeyError:
        return ""


def _login() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


# --- where to send it ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    hostname: str  # the config's, for Message-ID
    origin: str  # the domain of the default sender and of bare user names: the first local domain
    config: Path


def find_target(explicit: str | None) -> Target:
    """The first mx listener of the config. Reads only `hostname`, `[[listen]]` and
    `[relay] local_domains`:
    the server validated the rest, and an unprivileged user may not be able to
    read what the rest points at (TLS keys, password files)."""
    from gannet.config import find_config_file

    path = find_config_file(explicit)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigProblem(f"cannot read the config {path}: {exc.strerror}; give it with -C FILE") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"{path} is not valid TOML ({exc}); `gannet check-config` says more") from exc
    hostname = str(doc.get("hostname") or socket.getfqdn())
    local_domains = doc.get("relay", {}).get("local_domains") or [hostname]
    for entry in doc.get("listen", []):
        if isinstance(entry, dict) and entry.get("mode", "mx") == "mx":
            m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", str(entry.get("address", "")))
            if m:
                host = m.group(1) or m.group(3)
                host = {"0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}.get(host, host)
                return Target(host, int(m.group(2) or m.group(4)), hostname, str(local_domains[0]), path)
    raise ConfigProblem(
        f'{path} has no [[listen]] with mode = "mx": sendmail hands mail to one over SMTP; add '
        '[[listen]] address = "127.0.0.1:25" (mode "mx" is the default)'
    )


class ConfigProblem(Exception):
    pass


# --- the SMTP conversation ------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def submit(target: Target, sender: str, recipients: list[str], message: bytes, opts: Options) -> str:
    """One SMTP transaction; returns the server's reply to DATA. Raises Refused."""
    where = f"{target.host}:{target.port}"
    try:
        client = smtplib.SMTP(timeout=TIMEOUT)
        client.set_debuglevel(1 if opts.verbose else 0)
        client.connect(target.host, target.port)
    except (OSError, smtplib.SMTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Refused(
            EX_TEMPFAIL,
            f"gannet is not running on {where} ({reason}) — start it with `gannet serve` (config "
            f"{target.config}); the message was not sent, try again once it runs",
        ) from None
    try:
        with client:
            return _transaction(client, sender, recipients, message, opts)
    except smtplib.SMTPServerDisconnected:
        raise Refused(EX_TEMPFAIL, f"gannet on {where} closed the connection; try again") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise Refused(EX_TEMPFAIL, f"talking to gannet on {where} failed: {exc}; try again") from None


def _transaction(
    client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes, opts: Options
) -> str:
    code, reply = client.ehlo("localhost")
    if code != 250:
        raise _refusal("EHLO", code, reply, EX_PROTOCOL)
    mail_options: list[str] = []
    if any(b > 127 for b in message) and client.has_extn("8bitmime"):
        mail_options.append("BODY=8BITMIME")
    if any(not a.isascii() for a in (sender, *recipients)):
        if not client.has_extn("smtputf8"):
            raise Refused(EX_DATAERR, "non-ASCII addresses need SMTPUTF8, which the server does not offer")
        mail_options.append("SMTPUTF8")
    dsn = client.has_extn("dsn")
    if dsn and opts.ret:
        mail_options.append(f"RET={opts.ret}")
    if dsn and opts.envid:
        mail_options.append(f"ENVID={_xtext(opts.envid)}")
    code, reply = client.mail(sender, mail_options)
    if code != 250:
        raise _refusal(f"the sender <{sender}>", code, reply, EX_DATAERR)
    rcpt_options = [f"NOTIFY={opts.notify}"] if dsn and opts.notify else []
    refused = []
    for address in recipients:
        code, reply = client.rcpt(address, rcpt_options)
        if code not in (250, 251):
            refused.append((address, code, reply.decode("utf-8", "replace")))
    if refused:
        client.rset()
        temporary = any(400 <= code < 500 for _a, code, _r in refused)
        relay = any("5.7.1" in text for _a, _c, text in refused)
        lines = "; ".join(f"<{a}>: {code} {text}" for a, code, text in refused)
        status = EX_TEMPFAIL if temporary else (EX_NOPERM if relay else EX_NOUSER)
        hint = " (relaying from here needs 127.0.0.1 in [relay] trusted_networks)" if relay else ""
        raise Refused(status, f"recipient refused, nothing was sent: {lines}{hint}")
    code, reply = client.data(message)
    if code != 250:
        raise _refusal("the message", code, reply, EX_DATAERR)
    return reply.decode("utf-8", "replace")


def _refusal(what: str, code: int, reply: bytes, permanent: int) -> Refused:
    status = EX_TEMPFAIL if 400 <= code < 500 else permanent
    return Refused(status, f"{what} was refused: {code} {reply.decode('utf-8', 'replace')}")


def _xtext(value: str) -> str:
    """RFC 3461 §4: xtext for ENVID."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


# --- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, stdin: BinaryIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv:
        print(__doc__)
        return EX_OK
    try:
        opts = parse_args(argv)
    except Usage as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    if opts.newaliases:
        print(
            "sendmail: aliases are [mailboxes] aliases in Gannet's config; nothing to rebuild",
            file=sys.stderr,
        )
        return EX_OK
    try:
        target = find_target(opts.config)
    except ConfigProblem as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_CONFIG
    sender = opts.sender if opts.sender is not None else f"{_login()}@{target.origin}"
    data = read_message(stdin if stdin is not None else sys.stdin.buffer, opts.dot_ends)
    message, recipients = prepare(data, opts, sender, target)
    if not recipients:
        print(
            "sendmail: no recipients: give them as arguments, or use -t to take them from To, Cc and Bcc",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        reply = submit(target, sender, recipients, message, opts)
    except Refused as exc:
        print(f"sendmail: {exc.text}", file=sys.stderr)
        return exc.status
    if opts.verbose:
        print(f"sendmail: {reply}", file=sys.stderr)
    return EX_OK
