"""The package's shape, checked: no import cycles, no cross-module private names, a contract
layer that imports nothing from the pipeline, and public names that are not shadowed."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

import loaderkit

ROOT = Path(loaderkit.__file__).parent
PLUGINS = Path(importlib.import_module("loaderkit.plugins").__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for base, package in ((ROOT, "loaderkit"), (PLUGINS, "loaderkit.plugins")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "loaderkit" and parts[:1] == ["plugins"]:
                continue
            out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the module, function-level
    imports included; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node.level, node.module)
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{mod}.{n}" in MODULES]
            if len(subs) < len(names):
                found.append((mod, [n for n in names if n not in subs], node.lineno))
            found += [(f"{mod}.{n}", [], node.lineno) for n in subs]
    return [(m, ns, line) for m, ns, line in found if m in MODULES]


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_module_list_is_real():
    assert {"loaderkit.loader", "loaderkit.contract.records", "loaderkit.pipeline.negotiate",
            "loaderkit.plugins.fp8", "loaderkit.plugins.fp8_formats.common"} <= set(MODULES)
    assert any(GRAPH[m] for m in MODULES), "the import scan found no imports at all"


def _cycle() -> list[str] | None:
    """One import cycle among loaderkit's modules (a package importing its own submodule
    through ``__init__`` is not a cycle), or ``None``."""
    edges = {m: {t for t, _, _ in GRAPH[m] if not (t.startswith(m + ".") and _is_package(m))} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The check above can fail: a made-up back edge is reported as a cycle."""
    monkeypatch.setitem(GRAPH, "loaderkit.contract.records",
                        GRAPH["loaderkit.contract.records"] + [("loaderkit.loader", [], 0)])
    assert _cycle() is not None


def test_no_cross_module_private_names():
    bad = [
        f"{m}:{line} imports {name} from {target}"
        for m, imports in GRAPH.items()
        for target, names, line in imports
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != m
    ]
    assert not bad, "\n".join(bad)


def test_the_contract_imports_nothing_from_the_pipeline():
    contract = [m for m in MODULES if m.startswith("loaderkit.contract")]
    allowed = ("loaderkit.contract", "loaderkit.errors")
    bad = [
        f"{m}:{line} imports {target}"
        for m in contract
        for target, _, line in GRAPH[m]
        if not target.startswith(allowed)
    ]
    assert contract and not bad, "\n".join(bad)


def test_kernels_depend_only_on_the_contract():
    bad = [
        f"{m}:{line} imports {t}"
        for m in MODULES if m.startswith("loaderkit.kernels")
        for t, _, line in GRAPH[m]
        if not t.startswith(("loaderkit.contract", "loaderkit.errors", "loaderkit.kernels"))
    ]
    assert not bad, "\n".join(bad)


def test_plugins_use_the_plugin_namespace():
    """Built-in plugins reach loaderkit through loaderkit.plugin (and errors, the kernels),
    never through the pipeline's modules: they go through the same door as third parties."""
    allowed = ("loaderkit.plugin", "loaderkit.errors", "loaderkit.kernels", "loaderkit.plugins")
    bad = [
        f"{m}:{line} imports {t}"
        for m in MODULES if m.startswith("loaderkit.plugins")
        for t, _, line in GRAPH[m]
        if not t.startswith(allowed) and t != "loaderkit"
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", [n for n in loaderkit.__all__ if not n.startswith("_")])
def test_public_names_are_not_shadowed_submodules(name):
    """``loaderkit.plan`` is the function, and no submodule of that name hides behind it."""
    assert importlib.util.find_spec(f"loaderkit.{name}") is None or not callable(getattr(loaderkit, name))


def test_submodule_records_are_importable_by_path():
    import loaderkit.contract.plan
    import loaderkit.pipeline.verify

    assert loaderkit.contract.plan.Plan is loaderkit.Plan
    assert callable(loaderkit.plan) and callable(loaderkit.verify)
    assert loaderkit.pipeline.verify.verify is loaderkit.verify


def test_top_level_api_is_small():
    # 20 names, the pipeline pair (plan_pipeline, load_pipeline) and the LoRA pair (add_lora, remove_lora);
    # their records live in loaderkit.plugin, LoraError in loaderkit.errors
    assert len(loaderkit.__all__) <= 24, loaderkit.__all__
    assert {"load", "plan", "inspect", "verify", "convert", "strategy", "register", "unregister",
            "load_pipeline", "plan_pipeline",
            "LoaderKitError", "PlanError", "Plan", "__version__"} <= set(loaderkit.__all__)
