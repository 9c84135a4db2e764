"""The import rules of DESIGN.md §2, checked on the source (every import statement, not only top-level ones)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "pipeline": {"torch", "models", "timm", "torchvision", "stages"},
    "stages": {"prefect", "pipeline", "prefect_dask"},
    "models": {"prefect", "dvc", "dvclive", "shards", "stages", "pipeline", "yaml", "pyarrow", "PIL"},
    "shards": {"torch", "models", "stages", "pipeline", "timm", "torchvision", "prefect"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_roots(path) & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "layer rule broken (DESIGN.md §2):\n" + "\n".join(bad)


def test_checker_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    import torch.nn as nn\n    from models.toco import ToCo\n")
    assert {"torch", "models"} <= imported_roots(f)
