"""Typed readers for TOML values, each failing with (file, key, reason, allowed).

The generic half of config.py: tables with allowed keys, strings, integers in
a range, booleans, durations ("30s", "5m"), sizes ("50M"), paths relative to
the config file, enums and choices, "host:port" addresses. `config.py` walks
the sections with these. No I/O.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A problem in the config file, precise enough to fix without reading code."""

    def __init__(self, file: Path | str, key: str, reason: str, allowed: str = "") -> None:
        self.file, self.key, self.reason, self.allowed = str(file), key, reason, allowed
        msg = f"{file}: {key}: {reason}" if key else f"{file}: {reason}"
        if allowed:
            msg += f" (allowed: {allowed})"
        super().__init__(msg)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


class ValueReader:
    """Reads values out of one parsed TOML document; subclassed by config._Reader."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.file = path
        self.base = path.resolve().parent
        self.doc = doc
        self.warnings: list[str] = []

    def fail(self, key: str, reason: str, allowed: str = "") -> ConfigError:
        return ConfigError(self.file, key, reason, allowed)

    # -- typed getters ------------------------------------------------------
    def table(self, parent: dict[str, Any], name: str, key: str, allowed: set[str]) -> dict[str, Any]:
        value = parent.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_kind(value)}")
        for k in value:
            if k not in allowed and not k.startswith("testing_"):
                raise self.fail(f"{key}.{k}", "unknown key", ", ".join(sorted(allowed)))
            if k.startswith("testing_"):
                self.warnings.append(f"{key}.{k} is a testing-only setting")
        return value

    def string(self, t: dict[str, Any], name: str, key: str, default: str) -> str:
        value = t.get(name, default)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_kind(value)}")
        return value

    def integer(self, t: dict[str, Any], name: str, key: str, default: int, lo: int, hi: int) -> int:
        value = t.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {_kind(value)}", f"{lo}..{hi}")
        if not lo <= value <= hi:
            raise self.fail(key, f"{value} is out of range", f"{lo}..{hi}")
        return value

    def boolean(self, t: dict[str, Any], name: str, key: str, default: bool) -> bool:
        value = t.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def strings(self, t: dict[str, Any], name: str, key: str) -> tuple[str, ...]:
        value = t.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return tuple(value)

    def duration(self, t: dict[str, Any], name: str, key: str, default: float) -> float:
        value = t.get(name)
        if value is None:
            return default
        return self.parse_duration(value, key)

    def parse_duration(self, value: Any, key: str) -> float:
        m = _DURATION.match(value) if isinstance(value, str) else None
        if not m:
            raise self.fail(
                key, f"{value!r} is not a duration", 'a number and a unit: "30s", "5m", "4h", "5d"'
            )
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]

    def size(self, t: dict[str, Any], name: str, key: str, default: int) -> int:
        value = t.get(name)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        m = _SIZE.match(value) if isinstance(value, str) else None
        if not m:
            raise self.fail(key, f"{value!r} is not a size", 'bytes, or "512K", "50M", "1G"')
        return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].upper()]

    def choice(self, t: dict[str, Any], name: str, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.string(t, name, key, default)
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not allowed", " | ".join(allowed))
        return value

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def enum(self, t: dict[str, Any], name: str, key: str, cls: type[enum.Enum], default: Any) -> Any:
        value = t.get(name, default.value)
        try:
            return cls(value)
        except ValueError:
            raise self.fail(key, f"{value!r} is not allowed", " | ".join(m.value for m in cls)) from None


def _kind(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
