"""The command table: wire verb → (Cmd, argument parser, flags), declared once.

Owns: which verbs exist, what their arguments mean (MAIL/RCPT parameters per
RFC 1870, 3461, 4954 §5, 6152, 6531), and per-verb flags (after Postfix's
smtpd_cmd_table):

- PRE_TLS: allowed before STARTTLS on a listener with tls_required;
- LAST_IN_GROUP: RFC 2920 §3.1, must end a pipelined group;
- COUNTS_AS_JUNK: NOOP/VRFY/RSET/ETRN, limited (Postfix smtpd_junk_command_limit);
- UTF8_ARG: the argument may carry UTF-8 (RFC 6531 addresses);
- SMTP_ONLY / LMTP_ONLY: HELO/EHLO vs LHLO (RFC 2033 §4.1);
- NOT_IMPLEMENTED: 502 (EXPN, TURN, ETRN);
- FORBIDDEN: an HTTP verb on the SMTP port: 421 and close (Postfix smtpd_forbidden_commands).

Parsers are pure: (argument, options, transaction-is-SMTPUTF8) → event, or
SyntaxProblem. They never look at the connection state; sequence rules live
in state.py, and nothing here dispatches by method name.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gannet.smtp import lmtp
from gannet.smtp.events import (
    Bdat,
    BodyType,
    Data,
    Ehlo,
    Event,
    Helo,
    Help,
    MailFrom,
    Noop,
    Notify,
    Quit,
    RcptTo,
    Ret,
    Rset,
    StartTls,
    Vrfy,
)
from gannet.smtp.replies import (
    R501_SYNTAX_PARAMS,
    R552_TOO_BIG,
    R553_NEED_SMTPUTF8,
    R555_PARAM_NOT_RECOGNIZED,
)
from gannet.smtp.state import Cmd
from gannet.smtp.syntax import (
    SyntaxProblem,
    parse_domain_arg,
    parse_forward_path,
    parse_params,
    parse_reverse_path,
    parse_size,
    split_path,
    xtext_decode,
)

if TYPE_CHECKING:
    from gannet.smtp.server import ServerOptions


class Flag(enum.Flag):
    NONE = 0
    PRE_TLS = enum.auto()
    LAST_IN_GROUP = enum.auto()
    COUNTS_AS_JUNK = enum.auto()
    UTF8_ARG = enum.auto()
    SMTP_ONLY = enum.auto()
    LMTP_ONLY = enum.auto()
    NOT_IMPLEMENTED = enum.auto()
    FORBIDDEN = enum.auto()


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """AUTH's argument, handed to sasl.start() by the server."""

    argument: str


Parsed = Event | AuthRequest
Parser = Callable[[str, "ServerOptions", bool], Parsed]


@dataclass(frozen=True, slots=True)
class Command:
    """One table row. The flags are also unpacked into plain bools: enum.Flag
    arithmetic costs microseconds per command on the hot path."""

    cmd: Cmd | None  # None: refused whatever the state (NOT_IMPLEMENTED, FORBIDDEN)
    parser: Parser | None
    flags: Flag
    pre_tls: bool = False
    last_in_group: bool = False
    junk: bool = False
    smtp_only: bool = False
    lmtp_only: bool = False
    forbidden: bool = False
    utf8_arg: bool = False


def _row(cmd: Cmd | None, parser: Parser | None, flags: Flag) -> Command:
    return Command(
        cmd,
        parser,
        flags,
        pre_tls=Flag.PRE_TLS in flags,
        last_in_group=Flag.LAST_IN_GROUP in flags,
        junk=Flag.COUNTS_AS_JUNK in flags,
        smtp_only=Flag.SMTP_ONLY in flags,
        lmtp_only=Flag.LMTP_ONLY in flags,
        forbidden=Flag.FORBIDDEN in flags,
        utf8_arg=Flag.UTF8_ARG in flags,
    )


def _no_args(event: Event) -> Parser:
    def parse(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
        if arg.strip(" "):
            raise SyntaxProblem(R501_SYNTAX_PARAMS, "command takes no argument")
        return event

    return parse


def _helo(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    return Helo(parse_domain_arg(arg))


def _ehlo(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    return Ehlo(parse_domain_arg(arg))


def _vrfy(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    arg = arg.strip(" ")
    if not arg:
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "VRFY needs an argument")
    return Vrfy(arg)


def _help(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    return Help(arg.strip(" "))


def _noop(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    return _NOOP  # RFC 5321 §4.1.1.9: any argument is ignored


def _auth(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    if not arg.strip(" "):
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "AUTH needs a mechanism")
    return AuthRequest(arg)


def parse_bdat(arg: str) -> Bdat:
    """RFC 3030 §2: "BDAT" SP chunk-size [ SP end-marker ]; end-marker = "LAST"."""
    parts = arg.split()
    if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "BDAT size [LAST]")
    return Bdat(parse_size(parts[0]), len(parts) == 2)


def _bdat(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    return parse_bdat(arg)


def _refuse_disabled(enabled: bool, key: str) -> None:
    if not enabled:
        raise SyntaxProblem(R555_PARAM_NOT_RECOGNIZED, f"{key}= of an extension not offered")


def _mail(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    """RFC 5321 §4.1.1.2 MAIL FROM:<reverse-path> [SP Mail-parameters]."""
    path, text = split_path(arg, "FROM:")
    address = parse_reverse_path(path)
    size: int | None = None
    body: BodyType | None = None
    smtputf8 = False
    ret: Ret | None = None
    envid: str | None = None
    auth: str | None = None
    for key, value in parse_params(text).items() if text else ():
        if key == "SIZE":  # RFC 1870 §6
            size = parse_size(value)
            if 0 < opts.max_message_size < size:
                raise SyntaxProblem(R552_TOO_BIG, f"declared SIZE {size}")
        elif key == "BODY":  # RFC 6152 §2
            _refuse_disabled(opts.eightbitmime, key)
            kinds = {"7BIT": BodyType.SEVEN_BIT, "8BITMIME": BodyType.EIGHT_BIT_MIME}
            body = kinds.get((value or "").upper())
            if body is None:
                raise SyntaxProblem(R501_SYNTAX_PARAMS, f"unknown BODY={value}")
        elif key == "SMTPUTF8":  # RFC 6531 §3.4
            _refuse_disabled(opts.smtputf8, key)
            if value is not None:
                raise SyntaxProblem(R501_SYNTAX_PARAMS, "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":  # RFC 3461 §4.3
            _refuse_disabled(opts.dsn, key)
            try:
                ret = Ret((value or "").upper())
            except ValueError:
                raise SyntaxProblem(R501_SYNTAX_PARAMS, f"bad RET={value}") from None
        elif key == "ENVID":  # RFC 3461 §4.4
            _refuse_disabled(opts.dsn, key)
            envid = xtext_decode(value or "")
        elif key == "AUTH":  # RFC 4954 §5
            _refuse_disabled(opts.auth, key)
            auth = xtext_decode(value or "")
        else:
            raise SyntaxProblem(R555_PARAM_NOT_RECOGNIZED, f"unknown MAIL parameter {key}")
    if not smtputf8 and not address.isascii():
        raise SyntaxProblem(R553_NEED_SMTPUTF8, "non-ASCII sender without SMTPUTF8")
    return MailFrom(address, size, body, smtputf8, ret, envid, auth)


_NOTIFY = {"SUCCESS": Notify.SUCCESS, "FAILURE": Notify.FAILURE, "DELAY": Notify.DELAY}


def _notify(value: str | None) -> Notify:
    """RFC 3461 §4.1: "NEVER" alone, or a comma list of SUCCESS, FAILURE, DELAY."""
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return Notify.NEVER
    flags = Notify.NONE
    for word in words:
        flag = _NOTIFY.get(word)
        if flag is None or flag in flags:
            raise SyntaxProblem(R501_SYNTAX_PARAMS, f"bad NOTIFY={value}")
        flags |= flag
    return flags


def _orcpt(value: str | None) -> str:
    """RFC 3461 §4.2: ORCPT=addr-type ";" xtext; returned as "type;decoded"."""
    kind, semi, addr = (value or "").partition(";")
    if not semi or not kind or not addr or not kind.replace("-", "").isalnum():
        raise SyntaxProblem(R501_SYNTAX_PARAMS, "bad ORCPT")
    return f"{kind};{xtext_decode(addr)}"


def _rcpt(arg: str, opts: ServerOptions, utf8: bool) -> Parsed:
    """RFC 5321 §4.1.1.3 RCPT TO:<forward-path> [SP Rcpt-parameters]."""
    path, text = split_path(arg, "TO:")
    address = parse_forward_path(path)
    if not utf8 and not address.isascii():
        raise SyntaxProblem(R553_NEED_SMTPUTF8, "non-ASCII recipient without SMTPUTF8")
    notify: Notify | None = None
    orcpt: str | None = None
    for key, value in parse_params(text).items() if text else ():
        if key == "NOTIFY":
            _refuse_disabled(opts.dsn, key)
            notify = _notify(value)
        elif key == "ORCPT":
            _refuse_disabled(opts.dsn, key)
            orcpt = _orcpt(value)
        else:
            raise SyntaxProblem(R555_PARAM_NOT_RECOGNIZED, f"unknown RCPT parameter {key}")
    return RcptTo(address, notify, orcpt)


_NOOP = Noop()
_F = Flag
_REFUSE = (None, None)

COMMANDS: dict[bytes, Command] = {
    b"HELO": _row(Cmd.HELO, _helo, _F.PRE_TLS | _F.LAST_IN_GROUP | _F.SMTP_ONLY),
    b"EHLO": _row(Cmd.EHLO, _ehlo, _F.PRE_TLS | _F.LAST_IN_GROUP | _F.SMTP_ONLY),
    b"LHLO": _row(Cmd.LHLO, lmtp.parse_lhlo, _F.PRE_TLS | _F.LAST_IN_GROUP | _F.LMTP_ONLY),
    b"MAIL": _row(Cmd.MAIL, _mail, _F.UTF8_ARG),
    b"RCPT": _row(Cmd.RCPT, _rcpt, _F.UTF8_ARG),
    b"DATA": _row(Cmd.DATA, _no_args(Data()), _F.LAST_IN_GROUP),
    b"BDAT": _row(Cmd.BDAT, _bdat, _F.NONE),
    b"RSET": _row(Cmd.RSET, _no_args(Rset()), _F.PRE_TLS | _F.COUNTS_AS_JUNK),
    b"NOOP": _row(Cmd.NOOP, _noop, _F.PRE_TLS | _F.LAST_IN_GROUP | _F.COUNTS_AS_JUNK),
    b"VRFY": _row(Cmd.VRFY, _vrfy, _F.LAST_IN_GROUP | _F.COUNTS_AS_JUNK),
    b"HELP": _row(Cmd.HELP, _help, _F.PRE_TLS | _F.LAST_IN_GROUP),
    b"QUIT": _row(Cmd.QUIT, _no_args(Quit()), _F.PRE_TLS | _F.LAST_IN_GROUP),
    b"STARTTLS": _row(Cmd.STARTTLS, _no_args(StartTls()), _F.PRE_TLS | _F.LAST_IN_GROUP),
    b"AUTH": _row(Cmd.AUTH, _auth, _F.LAST_IN_GROUP),
    b"EXPN": _row(*_REFUSE, _F.NOT_IMPLEMENTED | _F.LAST_IN_GROUP),
    b"TURN": _row(*_REFUSE, _F.NOT_IMPLEMENTED | _F.LAST_IN_GROUP),
    b"ETRN": _row(*_REFUSE, _F.NOT_IMPLEMENTED | _F.COUNTS_AS_JUNK),
    **{verb: _row(*_REFUSE, _F.FORBIDDEN) for verb in (b"CONNECT", b"GET", b"POST", b"PUT", b"HEAD")},
}
