"""Server-side TLS: the SSLContext for STARTTLS (RFC 3207) and implicit TLS (RFC 8314).

Built once at start-up from [tls] cert/key; a bad file is a config error
(file, key, reason) before anything listens. Also formats what Received
headers and logs say about a TLS session.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gannet.config import ConfigError, TlsConfig


def server_context(tls: TlsConfig, config_file: Path) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # RFC 8996: no TLS 1.0/1.1. MTAs talk to old peers, but 1.2 is 15 years old.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except FileNotFoundError as exc:
        raise ConfigError(config_file, "tls.cert", f"cannot read {exc.filename}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(config_file, "tls.cert", f"cannot load the certificate and key: {exc}") from exc
    return ctx


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """(version, "VERSION with cipher NAME (bits/bits bits)") for logs and Received."""
    if ssl_object is None:
        return "", ""
    version = ssl_object.version() or ""
    cipher = ssl_object.cipher()
    if not cipher:
        return version, version
    name, _, bits = cipher
    return version, f"{version} with cipher {name} ({bits}/{bits} bits)"
