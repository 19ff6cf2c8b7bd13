"""Import direction: flows -> pipeline -> odise_model; leaf model components never import each other; the
pipeline's jobs (annotate, evaluate, train) share modules but not each other's internals."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {
    "feature_extractor",
    "implicit_captioner",
    "pixel_decoder",
    "transformer_decoder",
    "classifier",
    "postprocess",
    "clip",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                pkg = ".".join(
                    path.relative_to(ROOT).parent.parts[
                        : len(path.relative_to(ROOT).parent.parts) - node.level + 1
                    ]
                )
                out.add(f"{pkg}.{node.module}" if node.module else pkg)
            elif node.module:
                out.add(node.module)
    return out


def test_import_direction():
    for package, forbidden in (("odise_model", ("pipeline", "flows")), ("pipeline", ("flows",))):
        for path in (ROOT / package).rglob("*.py"):
            bad = [m for m in _imports(path) if m.split(".")[0] in forbidden]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


JOBS = ("annotate", "evaluate", "train")
# the one sanctioned crossing: training scores held-out shards with the evaluation metrics
ALLOWED_CROSSINGS = {("train", "pipeline.evaluate.metrics")}


def test_pipeline_jobs_do_not_import_each_other():
    for job in JOBS:
        for path in (ROOT / "pipeline" / job).rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in JOBS or parts[1] == job:
                    continue
                assert (job, module) in ALLOWED_CROSSINGS, f"{path.relative_to(ROOT)} imports {module}"


def test_leaf_components_do_not_import_each_other():
    for leaf in LEAVES:
        imported = {
            m.split(".", 1)[1]
            for m in _imports(ROOT / "odise_model" / f"{leaf}.py")
            if m.startswith("odise_model.")
        }
        assert not (imported & (LEAVES - {leaf})), f"{leaf} imports {imported & LEAVES}"


def test_configs_hold_no_code():
    assert not list((ROOT / "configs").rglob("*.py"))


def test_import_odise_model_is_light():
    import subprocess
    import sys

    code = (
        "import sys, odise_model; odise_model.load_vocabulary('coco_panoptic'); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"


def _module_graph(package: str = "odise_model") -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from every import statement in the file (module level,
    inside functions, under ``TYPE_CHECKING``). ``from . import x`` and ``from .pkg import x`` count as
    importing ``x`` when ``x`` is a module; the package itself is ``odise_model.__init__``."""
    files = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py")}

    def resolve(name: str) -> str | None:
        if name == package:
            return f"{package}.__init__"
        return name if name in files else None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level else ""
                parent = ".".join(filter(None, [base, node.module]))
                targets = [f"{parent}.{a.name}" for a in node.names]
                if node.module:  # "from . import x" imports x, not the package's own code
                    targets.append(parent)
            else:
                continue
            out.update(t for t in map(resolve, targets) if t is not None and t != module)
        graph[module] = out
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_among_odise_model_modules():
    graph = _module_graph()
    assert "odise_model.checkpoint" in graph and graph["odise_model.build"]  # the graph was read
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_only_the_package_imports_build():
    """``build`` wires everything; the weight loaders below it (checkpoint, sd_convert, ...) never import it."""
    graph = _module_graph()
    assert "odise_model.build" not in graph["odise_model.checkpoint"]
    importers = sorted(m for m, deps in graph.items() if "odise_model.build" in deps)
    assert importers == ["odise_model.__init__"], importers
