"""`gannet dkim keygen`: make a DKIM key, write it (0600), print the DNS record and the config to add.

The key goes where the config already names it for that domain and selector,
else to `<data_dir>/dkim/<domain>.<selector>.key`. An existing file is never
replaced without `--force` (a replaced key breaks every signature in flight
until the new record is published). Prints the TXT record in zone-file form,
split into 255-octet strings, and the `[[dkim]]` table when the config lacks it.
"""

from __future__ import annotations

from typing import TextIO

from gannet.config import Config
from gannet.mailauth.keys import (
    KeyAlgorithm,
    SigningKey,
    config_snippet,
    default_key_path,
    generate_key,
    valid_domain,
    valid_selector,
    write_key,
)

RSA_BITS = (1024, 2048, 3072, 4096)


class KeygenRefused(Exception):
    """The key file exists and --force was not given."""


def keygen(
    config: Config, domain: str, selector: str, algorithm: KeyAlgorithm, bits: int, force: bool, out: TextIO
) -> None:
    """ValueError for a bad domain/selector/size; KeygenRefused for an existing key without force."""
    domain = domain.lower().rstrip(".")
    if not valid_domain(domain):
        raise ValueError(f"--domain {domain!r} is not a domain name (e.g. example.org)")
    if not valid_selector(selector):
        raise ValueError(f"--selector {selector!r} is not a selector: DNS labels (letters, digits, hyphens)")
    if algorithm is KeyAlgorithm.RSA and bits not in RSA_BITS:
        raise ValueError(f"--bits {bits}: use one of {', '.join(map(str, RSA_BITS))}")
    path = default_key_path(config, domain, selector)
    if path.exists() and not force:
        raise KeygenRefused(
            f"{path} exists; not replacing a key that may be in use (use --force to replace it, "
            "then publish the new record before reloading Gannet)"
        )
    private = generate_key(algorithm, bits)
    write_key(path, private, force=force)
    key = SigningKey(domain, selector, algorithm, private, path)
    size = f"{bits}-bit " if algorithm is KeyAlgorithm.RSA else ""
    out.write(f"wrote {path} ({size}{algorithm.value}, mode 0600)\n\n")
    out.write(f"Publish this TXT record in the DNS zone of {domain}:\n\n{key.zone_line()}\n\n")
    configured = any(e.domain == domain and e.selector == selector for e in config.dkim)
    if configured:
        out.write(f"{config.file} already names this key; reload Gannet (SIGHUP) to sign with it.\n")
    else:
        snippet = config_snippet(domain, selector, path)
        out.write(f"Add this to {config.file} and reload Gannet (SIGHUP):\n\n{snippet}")
    out.write(f"\nThen check it with: gannet doctor {domain}\n")
