"""The import rules of ARCHITECTURE.md, checked from the source so a later change cannot quietly break them.

Every ``import`` statement of the project's packages is read with :mod:`ast`, at any depth (imports
inside functions count: they are how a circle hides), relative imports resolved to absolute module
names. Two checks:

- **Boundaries.** ``shards`` imports no other project package (it is the contract); ``pipeline`` and
  ``trainer`` never import each other; ``evaluation`` uses only the model of ``trainer``
  (``trainer`` / ``trainer.model``) and the SAM code of ``pipeline`` (``pipeline.sam``,
  ``pipeline.models``); nothing imports ``infra``, ``benchmarks`` or ``tests``.
- **No circles.** The module graph (an edge per import, a package's ``__init__`` included) has no
  cycle of two or more modules. A package ``__init__`` that re-exports its submodules is not a
  circle with them, so edges from a submodule to its own package's ``__init__`` are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "pipeline", "trainer", "evaluation", "infra", "benchmarks")

#: package -> the project packages (or exact module prefixes) it may import besides itself.
ALLOWED: dict[str, tuple[str, ...]] = {
    "shards": (),
    "pipeline": ("shards",),
    "trainer": ("shards",),
    "evaluation": ("shards", "trainer.model", "pipeline.sam", "pipeline.models"),
    "infra": ("shards", "pipeline", "trainer", "evaluation"),
    "benchmarks": ("shards", "pipeline", "trainer", "evaluation"),
}
#: Exact modules a package may import (a package's ``__init__`` only, not its submodules).
ALLOWED_EXACT: dict[str, tuple[str, ...]] = {"evaluation": ("trainer", "pipeline")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of every module imported anywhere in the file (``from x import y`` gives x and x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in imports_of(path, name):
            # the most specific project module the import names (``from pkg import func`` -> pkg)
            candidate = imported
            while candidate and candidate not in mods:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
        edges[name] = targets
    return edges


def allowed(importer: str, target: str) -> bool:
    src_pkg, dst_pkg = importer.split(".")[0], target.split(".")[0]
    if src_pkg == dst_pkg:
        return True
    if target in ALLOWED_EXACT.get(src_pkg, ()):
        return True
    return any(target == p or target.startswith(p + ".") for p in ALLOWED[src_pkg])


def test_boundaries_hold():
    bad = sorted(f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts if not allowed(src, dst))
    assert not bad, "imports against the rules of ARCHITECTURE.md:\n" + "\n".join(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def without_parent_init_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop ``pkg.sub -> pkg`` (a submodule reading its package's re-exports is not a design circle)."""
    return {src: {dst for dst in dsts if not src.startswith(dst + ".")} for src, dsts in edges.items()}


def test_no_import_circles():
    found = cycles(without_parent_init_edges(graph()))
    assert not found, "import circles (imports inside functions included):\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("src,dst,ok", [
    ("shards.reader", "pipeline.record", False),
    ("pipeline.job", "trainer.model", False),
    ("trainer.data", "pipeline.images", False),
    ("evaluation.semseg", "trainer.model.use_model", True),
    ("evaluation.semseg", "trainer.train", False),
    ("evaluation.proposals", "pipeline.sam", True),
    ("evaluation.proposals", "pipeline.job", False),
    ("pipeline.stages.segmenter", "shards.rle", True),
])
def test_rule_table(src, dst, ok):
    """The checker itself: known-good and known-bad edges are classified as the rules say."""
    assert allowed(src, dst) is ok


def test_cycle_finder_sees_function_level_circles(tmp_path):
    """A circle closed only by an import inside a function is found."""
    a = tmp_path / "a.py"
    a.write_text("import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    import a\n")
    edges = {"a": {m for m in imports_of(a, "a") if m in ("a", "b")} - {"a"},
             "b": {m for m in imports_of(b, "b") if m in ("a", "b")} - {"b"}}
    assert cycles(edges) == [["a", "b"]]


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("seam,forbidden", [
    ("pipeline.sam", ("pipeline.stages", "pipeline.job", "pipeline.sources", "pipeline.config")),
    ("pipeline.models", ("pipeline.stages", "pipeline.job", "pipeline.sources", "pipeline.config")),
    ("trainer.model", ("trainer.train", "trainer.data", "trainer.cli", "trainer.checkpoint")),
])
def test_seams_do_not_pull_in_job_loops(seam, forbidden):
    """What evaluation may import stays a leaf: it never drags in a stage, a job loop or the training loop."""
    edges = graph()
    if seam not in edges:
        pytest.fail(f"{seam} does not exist")
    reached = sorted(m for m in closure(edges, seam) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not reached, f"{seam} imports (transitively) {reached}"
