#!/usr/bin/env python3
"""CPU time of one DKIM signature (and one ARC seal) per message, Gannet's Signer against dkimpy's own.

For each algorithm (rsa-2048, ed25519) and message size (default 4 KiB and
100 KiB), signs the same message N times in this process and prints the mean
wall time per call (no I/O is involved, so it is CPU time on one core):

- gannet: `Signer.sign` (key loaded once; dkimpy's canonicalization, the
  signature by OpenSSL through `cryptography`);
- dkimpy: `dkim.sign` with the PEM, as dkimpy is meant to be called (it
  re-parses the key and computes RSA with Python integers on every call);
- seal: `Signer.seal` (ARC: two RSA signatures, RSA keys only).

Usage: .venv/bin/python bench/dkim_sign.py [--count N] [--sizes 4096,102400]
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import dkim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization

from gannet.mailauth.keys import KeyAlgorithm, SigningKey, generate_key, pem_pkcs8
from gannet.mailauth.signing import Signer


def message(size: int) -> bytes:
    head = (b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: bench\r\n"
            b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def per_call_ms(work: Callable[[], object], count: int) -> float:
    work()  # warm up
    start = time.perf_counter()
    for _ in range(count):
        work()
    return (time.perf_counter() - start) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--sizes", default="4096,102400")
    args = parser.parse_args()
    print(f"{'algorithm':<10} {'size':>7} {'gannet ms':>10} {'dkimpy ms':>10} {'seal ms':>8}")
    for algorithm in KeyAlgorithm:
        private = generate_key(algorithm)
        key = SigningKey("example.test", "s1", algorithm, private, Path("-"))
        signer = Signer([key], seal_key=key if algorithm is KeyAlgorithm.RSA else None)
        if algorithm is KeyAlgorithm.RSA:
            dkimpy_key = pem_pkcs8(private)
        else:  # dkimpy wants the base64 of the raw 32-octet seed for Ed25519
            raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
            dkimpy_key = base64.b64encode(raw)
        for size in (int(s) for s in args.sizes.split(",")):
            msg = message(size)
            ours = per_call_ms(partial(signer.sign, msg), args.count)
            dkimpy_sign = partial(dkim.sign, msg, b"s1", b"example.test", dkimpy_key,
                                  canonicalize=(b"relaxed", b"relaxed"),
                                  signature_algorithm=algorithm.signature_algorithm)
            theirs = per_call_ms(dkimpy_sign, max(20, args.count // 10))
            seal = "-"
            if algorithm is KeyAlgorithm.RSA:
                sealing = partial(signer.seal, msg, "mx.example.test; arc=none")
                seal = f"{per_call_ms(sealing, args.count):.2f}"
            print(f"{algorithm.value:<10} {len(msg):>7} {ours:>10.2f} {theirs:>10.2f} {seal:>8}")


if __name__ == "__main__":
    main()
