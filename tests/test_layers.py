"""The house is layered: imports only run downward, the ground floor imports nothing of the project,
and no module imports itself back through others (read from the source with ast, lazy imports too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets", "augment", "loops", "teacher_student")
LAYER = {"datasets": 0, "augment": 1, "loops": 2, "teacher_student": 3, "run_cycle": 4}
IMPORT_ROOT = "cxr_noisy_student"
GROUND = {"datasets.errors", "datasets.environment", "datasets.atomic", "datasets.config", "loops.config",
          "teacher_student.layout"}
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found["run_cycle"] = ROOT / "run_cycle.py"
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (relative or through the import root), resolved to modules."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == IMPORT_ROOT:
                stem = node.module.split(".", 1)[1] if "." in node.module else ""
            elif node.module and node.module.split(".")[0] in PACKAGES:
                pytest.fail(f"{path}: absolute import of {node.module} (use relative imports inside the engine)")
            else:
                continue
            targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith(IMPORT_ROOT + ".")]
        for target in targets:
            if target in known:
                out.add(target)
                break
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_imports_only_run_downward(graph):
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
              if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert not upward, "upward imports: " + "; ".join(sorted(upward))


def test_ground_floor_imports_nothing_of_the_project(graph):
    for name in GROUND:
        assert name in graph, f"ground module {name} is missing"
        assert not graph[name], f"{name} is ground floor but imports {sorted(graph[name])}"


def test_no_import_circles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_is_a_house_of_its_own():
    long = {name: n for name, path in project_modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_the_walk_sees_relative_imports():
    """The checker itself: a known downward edge and a known package are found."""
    modules = project_modules()
    deps = imports_of("loops.train", modules["loops.train"], set(modules))
    assert "loops.config" in deps and "loops.trainer" in deps
