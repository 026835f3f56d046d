"""The floor plan: no import circle anywhere in the library, and imports only go down the layers
``pipeline`` -> ``stages`` -> ``models``, ``data``; the knob list is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("pipeline", "stages", "models", "data")
# What each layer may import from the project.
ALLOWED = {"pipeline": set(PACKAGES), "stages": {"stages", "models", "data"}, "models": {"models"},
           "data": {"data"}}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks are annotations only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from pkg import module" imports the module; "from module import name" the module itself
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name for name in submodules if name in modules] or [node.module]
        found |= {name for name in names if name in modules}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): runtime_imports(p, modules) for p in paths}


def test_the_library_has_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(other):], other]))
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_go_down_the_layers():
    wrong = [f"{name} imports {other}" for name, imports in import_graph().items() for other in imports
             if other.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_the_knob_list_is_a_leaf():
    assert import_graph()["stages.config"] == set()


def test_one_package_per_step_and_no_flat_stage_modules():
    flat = sorted(p.name for p in (REPO / "stages").glob("*.py"))
    # beside the knob list, the rules that fit its `auto` values to the data: no step of their own
    assert flat == ["__init__.py", "auto.py", "config.py", "metrics.py", "runtime.py"], flat
    for step in ("dataset", "pretrain", "cam", "seeds", "affinity", "seed_net", "propagation", "refine",
                 "segmentation", "report", "training"):
        assert (REPO / "stages" / step / "__init__.py").is_file(), step
