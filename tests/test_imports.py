"""fastcache's module structure: no import cycle at module level, the offline tools in one
package (``fastcache.tuning``) that the core does not pull in, and one name per thing
(``fastcache.calibrate`` is the function, whatever is imported; the command line is
``python -m fastcache.tuning``).

The import graph is read from the source with ``ast`` (no import runs): an edge A -> B
for every import statement that runs when A is imported — module level, including
``try`` / ``if`` bodies, excluding ``if TYPE_CHECKING:`` and imports inside functions.
``from P import name`` points at the submodule ``P.name`` where it is one (``from .. import
ops``), else at ``P``; importing ``P.Q.R`` also runs the packages ``P.Q`` and ``P`` that
are not already being imported (the importer's own ancestors are).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import fastcache

ROOT = Path(fastcache.__file__).resolve().parent

# Strongly connected components (sorted module names) that exist and are accepted for now;
# the lead shrinks this list. Today there is none: every cycle is a failure.
KNOWN_CYCLES: list[list[str]] = []

# The only core modules that import fastcache.tuning at module level, and what they import:
# the policies that read a profile's timesteps. (fastcache/__init__.py re-exports the public
# names; fastcache/config.py imports Profile inside the functions that need it.)
CORE_IMPORTS_OF_TUNING = {
    "fastcache.pipeline": {"fastcache.tuning", "fastcache.tuning.profile"},  # enable(pipe, profile, budget=K)
    # the demo is a command (python -m fastcache.demo), an offline tool itself: never imported by the core
    "fastcache.demo": {"fastcache.tuning", "fastcache.tuning.profile", "fastcache.tuning.schedule_proxy"},
    "fastcache.policies.block_cache": {"fastcache.tuning", "fastcache.tuning.profile"},
    "fastcache.policies.eoc": {"fastcache.tuning", "fastcache.tuning.profile"},
    "fastcache.policies.magcache": {"fastcache.tuning", "fastcache.tuning.profile"},
    "fastcache.policies.schedule": {"fastcache.tuning", "fastcache.tuning.profile"},
    "fastcache.policies.smoothcache": {"fastcache.tuning", "fastcache.tuning.profile"},
}


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every .py file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _module_level_imports(body):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                yield from _module_level_imports(node.orelse)
            else:
                yield from _module_level_imports(node.body)
                yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)


def _every_import(body):
    """Every import statement, the ones inside functions included (not TYPE_CHECKING blocks)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in {getattr(node.test, a, "") for a in ("id", "attr")}:
            yield from _every_import(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from _every_import(block)


def import_graph(root: Path, package: str, lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` its import runs (see the module docstring);
    ``lazy``: also the imports made inside functions (a cycle hidden by a deferred import)."""
    mods = _modules(root, package)
    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        walk = _every_import if lazy else _module_level_imports
        for node in walk(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = (base + ("." + node.module if node.module else "")) if node.level else node.module
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs + ([mod] if len(subs) < len(node.names) else [])
            for t in targets:
                while t in mods and t != name and not name.startswith(t + "."):
                    deps.add(t)  # t, then the packages above it that the importer is not inside
                    t = t.rpartition(".")[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_cycle_finder_sees_module_level_cycles_only(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("try:\n    from .a import x\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (pkg / "d.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import e\n")
    (pkg / "sub" / "m.py").write_text("")
    (pkg / "e.py").write_text("from .sub.m import y\n")  # runs pkg.sub first: a cycle
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == graph["pkg.d"] == set()
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.m"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.e", "pkg.sub"]]


def test_fastcache_has_no_module_level_import_cycle():
    found = cycles(import_graph(ROOT, "fastcache"))
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, f"module-level import cycles in fastcache/: {new}; import inside the function that needs it"
    gone = [c for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES in {__file__}: {gone}"


def test_fastcache_has_no_import_cycle_even_through_deferred_imports():
    """No cycle hidden by an import inside a function either (config <-> profile and
    runtime -> policies -> graphs -> runtime were such cycles)."""
    assert cycles(import_graph(ROOT, "fastcache", lazy=True)) == []


def test_the_core_does_not_import_the_offline_tools():
    graph = import_graph(ROOT, "fastcache")
    tuning = {m for m in graph if m == "fastcache.tuning" or m.startswith("fastcache.tuning.")}
    core = {m: deps & tuning for m, deps in graph.items() if m not in tuning and m != "fastcache" and deps & tuning}
    assert core == CORE_IMPORTS_OF_TUNING
    assert graph["fastcache.tuning"] == set(), "fastcache/tuning/__init__.py must import none of its modules"
    assert graph["fastcache.tuning.profile"] & tuning == set(), "the profile is the core's only way in: no more"


def test_importing_any_module_keeps_fastcache_calibrate_the_function():
    calibrate = fastcache.calibrate
    assert inspect.isfunction(calibrate)
    for info in pkgutil.walk_packages(fastcache.__path__, "fastcache."):
        if info.name.rpartition(".")[2] != "__main__":  # those run the command line
            importlib.import_module(info.name)
    assert fastcache.calibrate is calibrate, f"an import rebound fastcache.calibrate to {fastcache.calibrate!r}"
    for gone in ("calibrate", "calibration", "profile", "search", "scheduling"):
        assert not (ROOT / f"{gone}.py").exists(), f"fastcache/{gone}.py is back: it lives in fastcache/tuning/"


def test_python_m_fastcache_tuning_is_the_command_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-m", "fastcache.tuning", "--steps", "8", "--budget", "0", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "usage: python -m fastcache.tuning" in r.stderr and "--budget 0: must be in [1, 8]" in r.stderr
