"""gannet.policy stays pure: it imports only the layers to its left (STYLE.md layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gannet.policy

ALLOWED_GANNET = ("gannet.util", "gannet.smtp", "gannet.message", "gannet.queue.model",
                  "gannet.config", "gannet.policy")
# No sockets, event loop, subprocesses or network clients in policy code.
FORBIDDEN = {"asyncio", "socket", "ssl", "subprocess", "select", "selectors", "dns", "aiohttp",
             "urllib", "http", "sqlite3", "psycopg"}

MODULES = sorted(Path(gannet.policy.__file__).parent.glob("*.py"))


def imported_names(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_policy_imports(path: Path) -> None:
    for name in imported_names(path):
        if name == "gannet" or name.startswith("gannet."):
            assert name.startswith(ALLOWED_GANNET), f"{path.name} imports {name}"
        else:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_states_its_contract(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()) >= 3, f"{path.name} needs a module docstring"
