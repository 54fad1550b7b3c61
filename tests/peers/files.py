"""The files tests read and write: stored messages (Maildir), TOML configs, TLS certificates.

Reading a Maildir never changes it (no moving new/ to cur/); the TOML writer is a
small one for config dicts (tomllib reads, the standard library has no writer);
certificates come from trustme, a throw-away CA that must never be trusted outside a test.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def maildir_files(root: Path) -> list[Path]:
    """Every message file under ``root`` (any depth), in ``new/`` or ``cur/`` of a Maildir."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(
        p
        for p in root.rglob("*")
        if p.parent.name in ("new", "cur") and p.is_file() and not p.name.startswith(".")
    )


def read_headers(path: Path) -> email.message.Message:
    """The header section of a stored message (the body is not read)."""
    with open(path, "rb") as f:
        head = bytearray()
        for line in f:
            if line in (b"\n", b"\r\n"):
                break
            head += line
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(bytes(head))


def message_ids(paths: Iterable[Path]) -> list[str]:
    """The Message-ID of each file (``""`` where there is none), in order."""
    return [str(read_headers(p).get("Message-ID", "")).strip() for p in paths]


# --------------------------------------------------------------------------- TOML


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        s = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts: scalars, lists, [tables], [[arrays of tables]].

    Sub-tables of a table are written as inline tables (enough for aliases).
    """
    lines = [
        f"{k} = {toml_value(v)}"
        for k, v in doc.items()
        if not isinstance(v, Mapping) and not _is_table_array(v)
    ]
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"] + [
                f"{toml_value(str(kk))} = {toml_value(vv)}" if not _bare(kk) else f"{kk} = {toml_value(vv)}"
                for kk, vv in v.items()
            ]
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _bare(key: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+", key) is not None


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, Mapping) for i in v)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; tables merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsCerts:
    """A test CA and one server certificate (mx.example.test, localhost, 127.0.0.1), as files."""

    ca: Any  # trustme.CA
    ca_file: Path
    cert_file: Path  # the server certificate followed by its chain
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA (hostname checks on)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls_certs(
    directory: Path,
    names: Sequence[str] = ("mx.example.test", "localhost", "127.0.0.1"),
) -> TlsCerts:
    import trustme

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*names)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    key_file.chmod(0o600)
    return TlsCerts(ca, ca_file, cert_file, key_file)
