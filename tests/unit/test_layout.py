"""The layout's rules, read from the code: which part may import which, and no import cycle.

Every import counts, at the top of a module or inside a function, so a later change cannot
quietly break a rule with a lazy import.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ingest", "consumers", "flows", "tasks", "tests", "faults", "bench")
PRODUCT = ("ingest", "consumers", "flows", "tasks")


def part(module: str) -> str:
    """core, cli, consumers, flows, tasks, or the package of tests, faults or bench."""
    if module == "ingest.cli" or module.startswith("ingest.cli."):
        return "cli"
    top = module.split(".")[0]
    return "core" if top == "ingest" else top


# Which parts each part may import (its own always).
ALLOWED = {
    "core": set(),
    "tasks": {"core"},
    "flows": {"core", "tasks"},
    "consumers": {"core"},
    "cli": {"core", "tasks", "flows", "consumers"},
    "tests": {"core", "cli", "tasks", "flows", "consumers"},
    "faults": {"core", "cli", "tasks", "flows", "consumers", "tests"},
    "bench": {"core", "cli", "tasks", "flows", "consumers", "tests"},
}


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project's modules it imports (and their parent packages, which import runs too)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                # `from package import module` imports the module.
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        edges = set()
        for target in targets:
            pieces = target.split(".")
            edges.update(prefix for i in range(1, len(pieces) + 1) if (prefix := ".".join(pieces[:i])) in known)
        graph[name] = edges - {name}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({part(module)}) imports {target} ({part(target)})"
        for module, targets in graph.items() for target in targets
        if part(target) != part(module) and part(target) not in ALLOWED[part(module)]
    )


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first one again at the end), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_each_part_imports_only_what_the_layout_allows():
    graph = import_graph(REPO)
    assert {"ingest.settings", "ingest.cli.main", "consumers.consumer", "flows.ingest", "tasks.enrich",
            "tests.fixtures.stack", "faults.run", "bench.run"} <= set(graph)
    assert violations(graph) == []


def test_the_core_imports_no_other_part_of_the_project():
    graph = import_graph(REPO)
    core = {m: targets for m, targets in graph.items() if part(m) == "core"}
    assert core, "no core module found"
    assert {m: sorted(t for t in targets if part(t) != "core") for m, targets in core.items()} == {m: [] for m in core}


def test_no_import_cycle_anywhere():
    assert cycle(import_graph(REPO)) is None


def test_the_checks_catch_a_wrong_import_and_a_cycle(tmp_path):
    def write(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    for package in ("ingest", "ingest/cli", "consumers", "flows", "tasks"):
        write(f"{package}/__init__.py", "")
    write("ingest/db.py", "def f():\n    from consumers import topology\n")  # lazy, still counted
    write("consumers/topology.py", "import ingest.db\n")
    write("flows/a.py", "from flows import b\n")
    write("flows/b.py", "from flows.a import x\n")
    write("tasks/step.py", "from flows.a import x\n")
    graph = import_graph(tmp_path, PRODUCT)
    assert violations(graph) == [
        "ingest.db (core) imports consumers (consumers)",
        "ingest.db (core) imports consumers.topology (consumers)",
        "tasks.step (tasks) imports flows (flows)",
        "tasks.step (tasks) imports flows.a (flows)",
    ]
    assert set(cycle(graph)) in ({"ingest.db", "consumers.topology"}, {"flows.a", "flows.b"})
    del graph["flows.b"], graph["tasks.step"], graph["consumers.topology"]
    assert violations(graph) == ["ingest.db (core) imports consumers (consumers)",
                                 "ingest.db (core) imports consumers.topology (consumers)"]
    assert cycle(graph) is None


def test_a_flow_run_never_loads_the_amqp_side():
    """What a flow-run process imports (flows/forkserver.py loads flows.ingest and flows.backfill)
    reaches neither consumers/ nor the command line."""
    graph = import_graph(REPO)
    reached, todo = set(), ["flows.ingest", "flows.backfill"]
    while todo:
        current = todo.pop()
        if current not in reached:
            reached.add(current)
            todo.extend(graph.get(current, ()))
    assert "flows.steps" in reached
    assert sorted(m for m in reached if part(m) in ("consumers", "cli")) == []
