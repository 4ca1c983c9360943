"""The import graph of megaqwen (DESIGN decision 11): layering runs one way, no import cycles, and no
module reaches for another module's private names.

Every module under megaqwen/ is parsed with `ast` (kernels/, data_pipeline/ and conf/ as the
megaqwen.kernels / megaqwen.data_pipeline / megaqwen.conf they install as); nothing is imported.
Every import counts, at module level or inside a function: a lazy import is still a dependency, and
it is how a cycle hides. Each failure names the offending edges as file:line.

Packages: the sub-packages of megaqwen (models, parallel, train, convert, plan, data, kernels,
data_pipeline, conf), `eval` for megaqwen/eval.py + eval_long.py, and every other top-level module
(scaling, tokenizer, cli_common, ...) on its own.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"megaqwen": "megaqwen", "kernels": "megaqwen.kernels", "data_pipeline": "megaqwen.data_pipeline",
           "conf": "megaqwen.conf"}
"""Folder of the repository -> the dotted name its modules install under."""

KNOWN_PACKAGE_EDGES: dict[tuple[str, str], str] = {
    # (importing module, imported package): reason. Empty: every edge keeps the rules below. An
    # entry here must say why the edge stays and what would remove it.
}
"""(importing module, imported package) -> why the edge stays for now. Only the package-level rules
(cycles, layering) skip these; they stay visible in `edges()`."""


@dataclass(frozen=True)
class Edge:
    src: str
    """Importing module (dotted)."""
    dst: str
    """Imported module: the deepest megaqwen module the import statement names."""
    name: str | None
    """`from dst import name`: the name (None for `import dst` or when `name` is itself a module)."""
    where: str
    """file:line of the import statement."""
    lazy: bool
    """Inside a function (imported when called) rather than at module level."""

    def __str__(self) -> str:
        return f"{self.where} {self.src} -> {self.dst}{f' ({self.name})' if self.name else ''}" + \
            (" [lazy]" if self.lazy else "")


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed megaqwen tree."""
    out = {}
    for folder, dotted in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([dotted, *parts])] = path
    return out


def package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "megaqwen"
    return "eval" if parts[1] in ("eval", "eval_long") else parts[1]


def _resolve(name: str) -> str:
    """The deepest module of ours that a dotted name is or lies in (`megaqwen.conf` has no .py: kept)."""
    mods = modules()
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path):
        self.module, self.path, self.depth, self.edges = module, path, 0, []
        self.aliases: dict[str, str] = {}  # local name -> megaqwen module it is bound to
        self.private_uses: list[tuple[str, str, str]] = []  # (where, module, attribute)

    def _where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{node.lineno}"

    def _add(self, node: ast.AST, dst: str, name: str | None) -> None:
        self.edges.append(Edge(self.module, dst, name, self._where(node), self.depth > 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import):
        for a in node.names:
            if a.name == "megaqwen" or a.name.startswith("megaqwen."):
                self._add(node, _resolve(a.name), None)
                if a.asname:
                    self.aliases[a.asname] = _resolve(a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's own package
            here = self.module.split(".")
            pkg = here if self.path.name == "__init__.py" else here[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        if not (base == "megaqwen" or base.startswith("megaqwen.")):
            return
        for a in node.names:
            full = f"{base}.{a.name}"
            if full in modules() or full == "megaqwen.conf":  # `from megaqwen.train import resume`
                self._add(node, full, None)
                self.aliases[a.asname or a.name] = full
            else:
                self._add(node, _resolve(base), a.name)

    def visit_Attribute(self, node: ast.Attribute):
        # `ckpt._rank()` after `from megaqwen.train import checkpoint as ckpt` uses a private name too
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and _private(node.attr):
            self.private_uses.append((self._where(node), self.aliases[node.value.id], node.attr))
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def _collected() -> list[_Collector]:
    out = []
    for module, path in modules().items():
        c = _Collector(module, path)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out.append(c)
    return out


def edges() -> list[Edge]:
    return [e for c in _collected() for e in c.edges if e.dst != e.src]


def package_edges(skip_known: bool = True) -> dict[tuple[str, str], list[Edge]]:
    """(importing package, imported package) -> the import statements that make that dependency."""
    out: dict[tuple[str, str], list[Edge]] = {}
    for e in edges():
        a, b = package(e.src), package(e.dst)
        if a != b and not (skip_known and (e.src, b) in KNOWN_PACKAGE_EDGES):
            out.setdefault((a, b), []).append(e)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
    return found


def _cycle_report(comps: list[list[str]], edge_map: dict[tuple[str, str], list[Edge]]) -> str:
    lines = []
    for comp in comps:
        lines.append("cycle among " + ", ".join(comp) + ":")
        members = set(comp)
        for (a, b), es in sorted(edge_map.items()):
            if a in members and b in members:
                lines += [f"  {a} -> {b}: {e}" for e in es]
    return "\n".join(lines)


def test_the_graph_sees_every_kind_of_import():
    """The collector is not vacuous: it finds module-level, lazy and `from package import module`
    imports that are known to exist, and every package DESIGN names."""
    all_edges = edges()
    assert len(modules()) > 100 and len(all_edges) > 300
    assert {"models", "parallel", "train", "convert", "eval", "plan", "data", "kernels",
            "data_pipeline"} <= {package(m) for m in modules()}
    assert any(e.lazy for e in all_edges) and any(not e.lazy for e in all_edges)
    # `from megaqwen.parallel import setup as par` is an edge to the module, not to the package
    assert any(e.dst == "megaqwen.parallel.setup" and e.name is None for e in all_edges)


def test_no_package_cycles():
    """No cycle among the packages (models, parallel, train, convert, eval, plan, data, ...),
    counting lazy imports."""
    edge_map = package_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edge_map:
        graph.setdefault(a, set()).add(b)
    comps = cycles(graph)
    assert not comps, "import cycles between packages (DESIGN 11):\n" + _cycle_report(comps, edge_map)


STRICT = ("models", "parallel", "train", "convert", "eval", "plan", "data", "kernels")
"""Packages whose modules share no private names. Inside them, and everywhere else, a cycle of
modules is tolerated only where a lazy import closes it (models.spec's registry imports each spec);
train, convert, eval and plan (the entry points) have none at all."""


def _module_graph(keep) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[Edge]]]:
    edge_map: dict[tuple[str, str], list[Edge]] = {}
    for e in edges():
        if keep(e):
            edge_map.setdefault((e.src, e.dst), []).append(e)
    graph: dict[str, set[str]] = {}
    for a, b in edge_map:
        graph.setdefault(a, set()).add(b)
    return graph, edge_map


def test_no_module_cycles_among_the_entry_points():
    """No cycle among the modules of train, convert, eval, plan, parallel (train.main -> preflight ->
    stages -> main was one), lazy imports included: a cycle a lazy import hides still ties them."""
    acyclic = ("train", "convert", "eval", "plan", "parallel")
    graph, edge_map = _module_graph(lambda e: package(e.src) in acyclic and package(e.dst) in acyclic)
    comps = cycles(graph)
    assert not comps, "import cycles between modules:\n" + _cycle_report(comps, edge_map)


def test_no_eager_module_cycles_anywhere():
    """Module-level imports alone never form a cycle in any package (import order would decide
    whether it works)."""
    graph, edge_map = _module_graph(lambda e: not e.lazy)
    comps = cycles(graph)
    assert not comps, "module-level import cycles:\n" + _cycle_report(comps, edge_map)


FORBIDDEN = {
    # importing package: packages it must never import (DESIGN 1, 11, 12)
    "kernels": {"models", "parallel", "train", "convert", "eval", "plan", "data"},
    "parallel": {"models", "train", "convert", "eval", "plan"},
    "models": {"train", "convert", "eval", "plan"},
    "data": {"models", "parallel", "train", "convert", "eval", "plan"},
    "convert": {"eval", "plan"},
    "eval": {"train", "plan"},
    "plan": {"train", "convert", "eval"},
    "generate": {"train", "convert", "eval", "plan"},  # the trainer's rollouts import generate
    "rewards": {"parallel", "train", "convert", "eval", "plan", "generate"},
}
"""`train` is the top of the trainer (it may import everything below it, eval included); only `convert`
imports it back, by public names (from-deepspeed rebuilds the saved run with the trainer's builders),
so nothing train imports may import convert. The building blocks never import the tools above them."""


def test_layering_runs_one_way():
    bad = []
    for (a, b), es in sorted(package_edges().items()):
        if b in FORBIDDEN.get(a, ()) or (b == "train" and a not in ("train", "convert")):
            bad += [f"{a} -> {b}: {e}" for e in es]
        # the trainer and megaqwen never import the curation pipeline; it uses megaqwen.data
        if b == "data_pipeline":
            bad += [f"{a} -> {b}: {e}" for e in es]
    assert not bad, "imports against the layering (DESIGN 11):\n" + "\n".join(bad)


def test_models_never_import_torch_distributed():
    """The model is plain single-device PyTorch (DESIGN 1); only a spec's parallelize.py plans touch
    torch.distributed (through parallel/'s building blocks)."""
    bad = []
    for module, path in modules().items():
        if package(module) != "models" or path.name == "parallelize.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n == "torch.distributed" or n.startswith("torch.distributed.")]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    """`from megaqwen.x import _name` (or `x._name`) from another package, or from another module of
    a STRICT package: what is shared gets a public name, so what is private can change without
    breaking a caller elsewhere."""
    def shared(src: str, dst: str) -> bool:  # across packages, or between modules of a STRICT one
        return src != dst and (package(src) != package(dst) or package(src) in STRICT)

    bad = [f"{e}" for e in edges() if e.name and _private(e.name) and shared(e.src, e.dst)]
    bad += [f"{where} {c.module} uses {mod}.{attr}" for c in _collected()
            for where, mod, attr in c.private_uses if shared(c.module, mod)]
    assert not bad, "private names used from another module:\n" + "\n".join(bad)


def test_known_edges_still_exist():
    """A KNOWN_PACKAGE_EDGES entry whose import is gone is removed with it (so it cannot excuse a new one)."""
    present = {(e.src, package(e.dst)) for e in edges()}
    assert not set(KNOWN_PACKAGE_EDGES) - present, set(KNOWN_PACKAGE_EDGES) - present
