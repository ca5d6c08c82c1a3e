"""The layout's rules, read from the code: packages import only downward
(``sm_model`` -> ``pipelines`` -> ``sm_feed`` -> ``sm_eval`` -> ``sm_train``: the model package
imports no data pipeline, the feed joins the two), and loading a training config
pays for none of the model stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

LAYERS = ("sm_model", "pipelines", "sm_feed", "sm_eval", "sm_train")
"""Lowest first: a package may import itself and the packages before it, never one after it."""


def imported_packages(path: Path) -> dict[str, int]:
    """``{top-level package: first line}`` of every import in ``path``, function-level ones included."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.partition(".")[0], node.lineno)
    return found


def layer_violations(root: Path) -> list[str]:
    violations = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for imported, line in imported_packages(path).items():
                if imported in LAYERS and LAYERS.index(imported) > rank:
                    violations.append(f"{path.relative_to(root)}:{line}: {package} imports {imported}")
    return violations


def test_packages_import_only_downward() -> None:
    assert layer_violations(REPO_ROOT) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "sm_model" / "bad.py").write_text("def f():\n    from sm_eval.pck import summarize\n")
    (tmp_path / "sm_eval" / "good.py").write_text("import sm_model.pixels\nfrom pipelines import schema\n")
    assert layer_violations(tmp_path) == ["sm_model/bad.py:2: sm_model imports sm_eval"]


def test_loading_a_config_imports_no_model_stack() -> None:
    code = (
        "import sys\n"
        "from sm_train.config import load_config\n"
        "load_config('configs/demo.yaml', ['model.image_size=112'])\n"
        "print(sorted({'torch', 'kornia', 'timm', 'ray'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def module_cycles(root: Path) -> list[list[str]]:
    """Import cycles among the project's modules (function-level imports included), each as the
    modules around it."""
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for package in LAYERS
        for path in (root / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = imported
    cycles, done = [], set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append(trail[trail.index(name) :])
            return
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_no_two_modules_import_each_other() -> None:
    assert module_cycles(REPO_ROOT) == []


def test_the_cycle_check_sees_a_function_level_import(tmp_path: Path) -> None:
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "pipelines" / "a.py").write_text("from pipelines.b import f\n")
    (tmp_path / "pipelines" / "b.py").write_text("def f():\n    from pipelines import a\n")
    assert module_cycles(tmp_path) == [["pipelines.a", "pipelines.b"]]
