"""The layout's dependency rules (docs/architecture.md), read from the source's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lld_lightning"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports are not used here)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
    return names


def files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("data", ("lld_lightning.models", "lld_lightning.losses", "lld_lightning.module", "lld_lightning.callbacks")),
        ("models", ("lightning", "lld_lightning.losses", "lld_lightning.data", "lld_lightning.module")),
        ("losses", ("lightning", "lld_lightning.data", "lld_lightning.module", "lld_lightning.models.postprocess")),
        ("", ("research",)),
    ],
)
def test_layers_import_only_what_they_may(folder: str, forbidden: tuple[str, ...]) -> None:
    broken = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files(folder)
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not broken


def test_the_package_root_holds_only_what_every_user_touches() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__.py", "boxes.py", "cli.py", "constants.py", "module.py", "predictor.py"}
