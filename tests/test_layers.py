"""The layers of DESIGN.md hold: deploy -> server, client -> common; server and client never import
each other; common imports neither (nor deploy). And the installed packages are this checkout's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": {"client", "server", "deploy"}, "client": {"server", "deploy"}, "server": {"client", "deploy"}, "deploy": set()}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_against_the_layers(layer):
    bad = [(str(p.relative_to(ROOT)), sorted(imported_packages(p) & FORBIDDEN[layer])) for p in sorted((ROOT / layer).rglob("*.py"))]
    assert not [b for b in bad if b[1]], bad


def test_installed_packages_are_this_checkout():
    import client
    import common
    import deploy
    import server

    for pkg in (common, client, server, deploy):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT, pkg.__file__
