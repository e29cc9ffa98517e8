"""Each DVC stage's code: the project files its command runs, i.e. its import closure inside the repository.

``python tools/stage_deps.py`` prints every stage's code deps in dvc.yaml's form, to paste into dvc.yaml;
``tests/test_stage_deps.py`` fails when dvc.yaml and the closure disagree. A stage's command is
``python pipeline/run.py NAME``, which imports ``vitlab.stages.NAME``; every ``import`` statement in a file of
the closure counts (also one inside a function: it runs when that function does), except those under
``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "vitlab"


def module_file(name: str) -> Path | None:
    """The file of module ``name`` under src/ (a package's __init__.py); None if it is not the project's."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module that ``path`` imports, and for ``from package import name`` the submodule."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {name for name in names if name.split(".")[0] == PACKAGE}


def closure(roots: list[Path]) -> set[Path]:
    """The files ``roots`` import, transitively; importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stage_code(stage: str) -> list[str]:
    """The repository-relative paths of the files that ``python pipeline/run.py STAGE`` runs, sorted."""
    stage_module = module_file(f"{PACKAGE}.stages.{stage}")
    if stage_module is None:
        raise ValueError(f"no module {PACKAGE}.stages.{stage}")
    files = closure([REPO / "pipeline" / "run.py", stage_module])
    return sorted(str(path.relative_to(REPO)) for path in files)


if __name__ == "__main__":
    sys.path.insert(0, str(SRC))
    from vitlab.stages import NAMES

    for name in sys.argv[1:] or NAMES:
        print(f"  {name}:\n    deps:")
        print("\n".join(f"      - {path}" for path in stage_code(name)))
