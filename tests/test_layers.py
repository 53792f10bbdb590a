"""The layers import one way: api -> runtime -> policies / engines / energy -> core.

Fails on any upward (or sideways, between policies and engines) import, including imports inside
functions and under `TYPE_CHECKING`: each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from _factories import REPO

PACKAGES = {"runtime": "joulecap.runtime", "policies": "joulecap.policies", "kernels": "joulecap.kernels"}

CORE = (
    "joulecap.kernels",
    "joulecap.runtime.types",
    "joulecap.runtime.errors",
    "joulecap.runtime.requests",
    "joulecap.runtime.images",
    "joulecap.runtime.brevity",
    "joulecap.runtime.configtools",
    "joulecap.runtime.paths",
)
ENERGY = ("joulecap.runtime.energy",)
ENGINES = (
    "joulecap.runtime.engines",
    "joulecap.runtime.tiny_models",
    "joulecap.runtime.tiny_families",
    "joulecap.runtime.tiny_common",
)
POLICIES = ("joulecap.policies",)
API = ("joulecap.runtime.api",)
CLI = ("joulecap.runtime.cli",)

ALLOWED: dict[str, tuple[str, ...]] = {
    "core": CORE,
    "energy": CORE + ENERGY,
    "engines": CORE + ENERGY + ENGINES,
    "policies": CORE + POLICIES,
}
"""What each lower layer may import; `runtime` may import all but api and cli, api all but cli."""


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    """The layer of a joulecap module."""
    for name, prefixes in (
        ("core", CORE),
        ("energy", ENERGY),
        ("engines", ENGINES),
        ("policies", POLICIES),
        ("api", API),
        ("cli", CLI),
    ):
        if _in(module, prefixes):
            return name
    return "runtime"


def allowed(importer: str, imported: str) -> bool:
    """Whether `importer` may import `imported` (both joulecap modules)."""
    kind = layer(importer)
    if kind in ALLOWED:
        return _in(imported, ALLOWED[kind])
    if kind == "runtime":
        return not _in(imported, API + CLI)
    if kind == "api":
        return not _in(imported, CLI)
    return True


def modules() -> dict[str, Path]:
    """Every joulecap module of the three code folders."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """joulecap modules imported anywhere in `path`."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("joulecap.")}


def test_the_layer_map_sees_every_module() -> None:
    mods = modules()
    assert "joulecap.runtime.runtime" in mods and "joulecap.policies.base" in mods
    assert layer("joulecap.runtime.energy.accounting") == "energy"
    assert layer("joulecap.runtime.api.app") == "api"
    assert layer("joulecap.runtime.scheduler") == "runtime"
    # The scan finds imports inside functions too (the CLI imports lazily).
    found = imports(mods["joulecap.runtime.cli"], "joulecap.runtime.cli")
    assert {"joulecap.runtime.config", "joulecap.runtime.api.app", "joulecap.runtime.runtime"} <= found


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("joulecap.policies.base", "joulecap.runtime.predictor", False),
        ("joulecap.runtime.runtime", "joulecap.runtime.api.schema", False),
        ("joulecap.runtime.engines.vllm_engine", "joulecap.policies", False),
        ("joulecap.runtime.energy.accounting", "joulecap.runtime.engines.base", False),
        ("joulecap.runtime.types", "joulecap.runtime.scheduler", False),
        ("joulecap.runtime.engines.vllm_engine", "joulecap.runtime.energy.worklog", True),
        ("joulecap.runtime.scheduler", "joulecap.policies", True),
        ("joulecap.runtime.api.app", "joulecap.runtime.runtime", True),
    ],
)
def test_the_rule_itself(importer: str, imported: str, ok: bool) -> None:
    assert allowed(importer, imported) is ok


def test_nothing_imports_upward() -> None:
    bad = [
        f"{module} imports {target}"
        for module, path in modules().items()
        for target in sorted(imports(path, module))
        if not allowed(module, target)
    ]
    assert bad == []
