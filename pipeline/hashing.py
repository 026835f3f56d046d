"""Cache keys: a Merkle hash of a stage's significant parameters, its code and its inputs' keys.

The code part covers the modules a stage runs for its configuration (``StageTask.code_roots``: the step's entry
module and the chosen method's module) and everything they import from the project's library packages
(``stages``, ``models``, ``data``), found by reading import statements (nothing is imported), with the packages
that contain them. Steps pick methods from lazy registries (models.registry.LazyRegistry), so a method that is
not chosen is not imported and not hashed. Each module counts by its AST with docstrings removed, so comments,
blank lines and formatting never invalidate a cache, while any change to what the code does does.

The knob list (``VALUE_MODULES``) is left out: its values enter every key as parameters, so a changed default or
a new knob changes exactly the keys of the stages that have it.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LIBRARY_PACKAGES = ("stages", "models", "data")
VALUE_MODULES = frozenset({"stages.config"})
KEY_LENGTH = 16


def module_path(name: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _parsed(path: Path) -> tuple[str, tuple[str, ...]]:
    """(normalised-source digest, project modules imported) of one file, parsed again only when it changed."""
    return _parsed_source(path, path.relative_to(PROJECT_ROOT), path.read_text())


@cache
def _parsed_source(path: Path, relative: Path, source: str) -> tuple[str, tuple[str, ...]]:
    tree = ast.parse(source, filename=str(path))
    name = ".".join(relative.with_suffix("").parts)
    # The package relative imports resolve against: the module's parent, or the package itself.
    package = name.removesuffix(".__init__") if path.name == "__init__.py" else name.rpartition(".")[0]
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            imports.add(mod)
            imports.update(f"{mod}.{alias.name}" for alias in node.names)  # "from pkg import module"
    # A module's packages run before it: "stages.seeds.rules" brings "stages.seeds" and "stages".
    imports |= {name.rsplit(".", depth)[0] for name in list(imports) for depth in range(1, name.count(".") + 1)}
    imports |= {package} if package else set()
    project = tuple(sorted(m for m in imports if m.split(".")[0] in LIBRARY_PACKAGES and m not in VALUE_MODULES
                           and m != name and module_path(m)))
    normalised = ast.dump(_strip_docstrings(tree), annotate_fields=False, include_attributes=False)
    return hashlib.sha256(normalised.encode()).hexdigest(), project


def module_closure(roots: Iterable[str]) -> dict[str, str]:
    """module name -> normalised digest, for ``roots`` and every library module they import."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_path(name)
        if path is None:
            raise ModuleNotFoundError(f"stage code module {name!r} not found under {PROJECT_ROOT}")
        digest, imports = _parsed(path)
        seen[name] = digest
        todo.extend(imports)
    return dict(sorted(seen.items()))


def code_digest(modules: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


def stage_key(stage: str, params: dict, code: dict[str, str], inputs: dict[str, str]) -> str:
    payload = {"stage": stage, "params": params, "code": code_digest(code), "inputs": inputs}
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def clear_cache() -> None:
    _parsed_source.cache_clear()
