"""The package's layers import one way: core at the bottom, the jobs' CLI at the top.

core <- fixtures <- pipelines <- tracking <- serving <- bench <- cli. A module may import its own
layer and the layers below it, never one above; the core imports neither Ray, MLflow nor Serve.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sav_ray"
ORDER = ["core", "fixtures", "pipelines", "tracking", "serving", "bench", "cli"]
FORBIDDEN_IN_CORE = ("ray", "mlflow", "starlette", "fastapi")


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sav_ray":  # from sav_ray import core -> sav_ray.core
                names += [f"sav_ray.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sav_ray" and parts[1] in ORDER else None


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def test_every_module_sits_in_a_layer() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the layers: {loose}"
    assert {p.parent.name for p in modules()} == set(ORDER)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers_only(path: Path) -> None:
    own = ORDER.index(path.parent.name)
    upward = [m for m in imported_modules(path) if layer_of(m) and ORDER.index(layer_of(m)) > own]
    assert upward == [], f"{path.relative_to(ROOT)} imports a layer above its own: {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_knows_nothing_of_ray_mlflow_or_serve(path: Path) -> None:
    bad = [m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_CORE]
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sav_ray.tracking import runs\n", encoding="utf-8")
    assert "sav_ray.tracking" in imported_modules(module)
    assert layer_of("sav_ray.tracking") == "tracking"
