"""The package's layering, checked on its import graph (read with ``ast``; nothing is imported).

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module("...")`` with a literal name. Also: the YAML runtime environments carry
exactly the offline defaults of pipeline.core.offline.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parent.parent

# Layer of each subpackage of pipeline/, lowest first. An import may go to the same subpackage or to a
# lower layer; subpackages of one layer are independent siblings and must not import each other. The
# top-level pipeline/__init__.py is layer 0. A new subpackage fails test_every_subpackage_has_a_layer
# until it is placed here on purpose.
LAYERS = {
    "core": 1,  # config, cli, storage, ray_runtime, neighbours, stage, offline
    "io": 2,  # shards, decode, partitions, prompts, embeddings
    "download": 3,
    "ingest": 3,
    "embed": 3,
    "index": 3,
    "dedup": 4,
    "bundle": 5,
    "amg": 5,
    "audit": 6,
    "serve": 6,
}
# Narrower than its layer allows: the AMG library needs only core (the core.neighbours protocol).
ONLY_IMPORTS = {"amg": {"core"}}

# Top-level names the library must never import: the demo package, test-data generators, the tests.
FORBIDDEN = {"demo", "fixtures", "tests", "conftest"} | {p.stem for p in (REPO / "tests").glob("test_*.py")}


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the scanned root, for messages
    line: int
    importer: str  # dotted module name of the importing file
    target: str  # dotted name imported, resolved to the deepest known module where it is one

    def __str__(self) -> str:
        return f"{self.file}:{self.line}  {self.target}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collect_imports(root: Path, package: str = "pipeline") -> tuple[set[str], list[Import]]:
    """All modules of ``root/package`` and every import they make."""
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(f, root) for f in files}

    def resolve(name: str) -> str:
        """``name`` itself, or its longest prefix that is a module of the library (``pkg.mod.Class``)."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return name

    imports = []
    for f in files:
        importer = module_name(f, root)
        is_pkg = f.name == "__init__.py"
        rel = f.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    pkg = importer.split(".") if is_pkg else importer.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import name`: name may be a submodule; otherwise it is an attribute of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call) and _is_import_module(node):
                targets = [node.args[0].value]
            imports.extend(Import(rel, node.lineno, importer, resolve(t)) for t in dict.fromkeys(targets))
    return modules, sorted(imports, key=lambda i: (i.file, i.line, i.target))


def _is_import_module(call: ast.Call) -> bool:
    """``importlib.import_module("literal")`` or ``import_module("literal")``."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
    arg = call.args[0] if call.args else None
    return name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


def subpackage(module: str) -> str | None:
    """``pipeline.audit.report`` -> ``audit``; None for the top-level ``pipeline`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(
    imports: list[Import], layers: dict[str, int], package: str = "pipeline"
) -> list[Import]:
    """Imports that go up a layer, across to a sibling of the same layer, or outside ONLY_IMPORTS."""
    bad = []
    for imp in imports:
        if imp.target != package and not imp.target.startswith(package + "."):
            continue
        src, dst = subpackage(imp.importer), subpackage(imp.target)
        if src == dst or (dst is None and src is not None):
            continue  # same subpackage, or down to the top-level package (layer 0)
        if src is None or src not in layers or dst not in layers:
            bad.append(imp)  # the top-level package imports nothing; unplaced packages fail below too
        elif layers[dst] >= layers[src] or (src in ONLY_IMPORTS and dst not in ONLY_IMPORTS[src]):
            bad.append(imp)
    return bad


def find_cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Import cycles between library modules, each as ``[a, b, ..., a]``; a module already on a
    reported cycle starts no further search, so each tangle is reported about once."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.target in modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)

    def shortest_cycle(start: str) -> list[str] | None:
        paths = {start: [start]}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                return paths[v] + [start]
            for w in sorted(graph[v] - paths.keys()):
                paths[w] = paths[v] + [w]
                queue.append(w)
        return None

    cycles: list[list[str]] = []
    for start in sorted(graph):
        if not any(start in c for c in cycles) and (cycle := shortest_cycle(start)):
            cycles.append(cycle)
    return cycles


def forbidden_imports(imports: list[Import], forbidden: set[str] = FORBIDDEN) -> list[Import]:
    return [imp for imp in imports if imp.target.split(".")[0] in forbidden]


def _listing(imports: list[Import]) -> str:
    return "\n".join(f"  {imp}" for imp in imports)


MODULES, IMPORTS = collect_imports(REPO)


def test_imports_go_only_down_the_layers():
    bad = layer_violations(IMPORTS, LAYERS)
    assert not bad, (
        "imports that go up a layer or across to a same-layer sibling (see LAYERS in this file):\n"
        + _listing(bad)
    )


def test_no_import_cycles():
    cycles = find_cycles(MODULES, IMPORTS)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_library_never_imports_demo_or_tests():
    bad = forbidden_imports(IMPORTS)
    assert not bad, "pipeline/ imports the demo package, test fixtures or tests:\n" + _listing(bad)


def test_every_subpackage_has_a_layer():
    found = {subpackage(m) for m in MODULES} - {None}
    unplaced, stale = sorted(found - LAYERS.keys()), sorted(LAYERS.keys() - found)
    assert not unplaced, (
        f"subpackages (or top-level modules) of pipeline/ without a layer in LAYERS: {unplaced}"
    )
    assert not stale, f"LAYERS names subpackages that pipeline/ does not have: {stale}"


def test_checker_reports_a_bad_graph(tmp_path: Path):
    """A synthetic package with an upward import, a sibling import, a cycle and a demo import."""
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/config.py": "def f():\n    from pipeline.audit import report\n",  # up, inside a function
        "embed/__init__.py": "",
        "embed/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.index.b\n",
        "index/__init__.py": "",
        "index/b.py": "",
        "audit/__init__.py": "",
        "audit/report.py": "from . import store\nimport demo.run\n",
        "audit/store.py": "from pipeline.audit.report import Report\n",  # back to report: a cycle
    }
    for name, text in files.items():
        (tmp_path / "pipeline" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / name).write_text(text)
    modules, imports = collect_imports(tmp_path)

    assert [str(i) for i in layer_violations(imports, LAYERS)] == [
        "pipeline/core/config.py:2  pipeline.audit.report",
        "pipeline/embed/a.py:3  pipeline.index.b",
    ]
    assert find_cycles(modules, imports) == [
        ["pipeline.audit.report", "pipeline.audit.store", "pipeline.audit.report"]
    ]
    assert [str(i) for i in forbidden_imports(imports)] == ["pipeline/audit/report.py:2  demo.run"]


def test_runtime_env_yamls_carry_exactly_the_offline_defaults():
    """Ray workers read these files, so they keep literal values; they must match OFFLINE_ENV."""
    runtime_env = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    rayjob = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert runtime_env["env_vars"] == OFFLINE_ENV
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"] == OFFLINE_ENV
