"""The package's shape: no import circle between modules (imports inside functions count too),
the rooms of the house import only rooms below them, no file over ~400 lines, and the public
API is what `import bigbatch` offers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import bigbatch

PACKAGE = Path(bigbatch.__file__).parent

# Lowest first. A module may import modules of its own room and of rooms before it, never after.
ROOMS = ["errors", "devices", "batch", "optim", "config", "model", "parallel", "engine", "data",
         "tasks", "planning", "run", "report", "tools", "cli", "__main__", "__init__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The bigbatch modules that `path` imports anywhere in its body (typing-only imports under
    `if TYPE_CHECKING:` excluded: they never run)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_a_module_that_depends_on_it():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_rooms_import_only_rooms_below_them():
    wrong = [f"{module} imports {target}" for module, targets in graph().items()
             for target in targets if ROOMS.index(room(target)) > ROOMS.index(room(module))]
    assert not wrong, "\n".join(wrong)


def test_the_top_level_is_rooms_only():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert entries == sorted(["__init__.py", "__main__.py", "batch.py", "cli.py", "devices.py",
                              "errors.py", "config", "data", "model", "optim", "engine", "parallel", "planning",
                              "run", "report", "tasks", "tools"])


def test_no_file_over_four_hundred_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def task_name_comparisons(path: Path) -> list[str]:
    """Where `path` compares a task with a name: `<x>.task == "lm"`, `task != "classify"`,
    `cfg.train.task in ("lm", ...)` and the like (a string constant against anything called
    `task`)."""
    def is_task(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "task") or (
            isinstance(node, ast.Name) and node.id == "task")

    def is_name(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set))
            and any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts))

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_task(side) for side in sides) and any(is_name(side) for side in sides):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_module_outside_the_tasks_asks_which_task_is_running():
    """A task answers what other rooms ask (tasks/base.py Task): its unit, its model head, its
    probe batch, whether verify and cbs apply. Comparing `train.task` with a name elsewhere would
    make each new task a change in many rooms."""
    found = [hit for path in PACKAGE.rglob("*.py") if room(module_name(path)) != "tasks"
             for hit in task_name_comparisons(path)]
    assert not found, found


def test_the_task_name_check_finds_a_comparison(tmp_path):
    """The check above is not blind: it finds the comparisons it forbids."""
    probe = PACKAGE / "_layout_probe.py"
    probe.write_text('def f(cfg):\n    return cfg.train.task == "lm" or cfg.train.task in ("a",)\n')
    try:
        assert task_name_comparisons(probe) == ["_layout_probe.py:2", "_layout_probe.py:2"]
    finally:
        probe.unlink()


def test_every_task_choice_is_a_task_folder():
    from bigbatch.config.sections import TASKS as CHOICES
    from bigbatch.tasks import TASKS

    assert sorted(CHOICES) == sorted(TASKS)
    assert all((PACKAGE / "tasks" / name / "__init__.py").is_file() for name in TASKS)
    for name, task in TASKS.items():  # the head the wiring builds is the one the Task declares
        wiring = importlib.import_module(f"bigbatch.tasks.{name}.wiring")
        assert wiring.MODEL_HEAD == task.model_head
