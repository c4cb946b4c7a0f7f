"""The house's rules, read from the source: arrows point down the layers, no import circles, no oversized modules,
and SafeWorld's gold judges serve evaluation only. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "safealign"

# Lowest first: a module may import its own room and the rooms before it, never one after it.
LAYERS = ["io", "config", "console", "run_directory", "data", "models", "training", "algorithms", "evaluation",
          "pipeline", "cli"]
MAX_LINES = 700  # any module (SafeWorld's word lists aside)
MAX_LINES_ENGINES = 400  # the pipeline, report, comparison and RL engine modules
ENGINES = ["pipeline/", "evaluation/report/", "evaluation/compare.py", "training/rl.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("safealign", *parts)).removesuffix(".__init__")


def own_imports(path: Path, modules: set[str]) -> set[str]:
    """The safealign modules `path` imports, anywhere in the file. `from safealign.x import y` is an arrow to
    safealign.x.y when that is a module (a package's submodule, not its __init__), else to safealign.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "safealign":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "safealign")
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in SRC.rglob("*.py")}
    return {name: {t for t in own_imports(path, set(files)) if t in files and t != name} for name, path in files.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "safealign"


def test_every_module_lives_in_a_known_layer():
    assert {room(m) for m in import_graph()} - {"safealign"} <= set(LAYERS)


def test_arrows_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if room(a) in LAYERS and room(b) in LAYERS and LAYERS.index(room(b)) > LAYERS.index(room(a))]
    assert upward == []


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_gold_judges_serve_evaluation_only():
    judges = "safealign.data.safeworld"
    users = [m for m, targets in import_graph().items()
             if any(t == judges or t.startswith(judges + ".") for t in targets)
             and room(m) in ("data", "models", "training", "algorithms") and not m.startswith(judges)]
    assert users == []


def test_modules_stay_small():
    too_long = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_LINES_ENGINES if any(relative.startswith(e) for e in ENGINES) else MAX_LINES
        if relative == "data/safeworld/lexicon.py":  # the world's word lists
            continue
        if lines > limit:
            too_long.append(f"{relative}: {lines} lines (limit {limit})")
    assert too_long == []
