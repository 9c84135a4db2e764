"""The import rules of DESIGN.md §2, checked on the source (every import statement, not only top-level ones):
who may import whom, no import cycle anywhere, no stage importing another, torch-free layers torch-free through
everything they import."""

import ast
from pathlib import Path

import pytest

from shards.fingerprint import CODE_FOLDERS, import_closure, module_path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (*CODE_FOLDERS, "pipeline")
HELPERS = {"config", "labelling", "parallel", "refinement", "synth", "training"}

FORBIDDEN = {
    "pipeline": {"torch", "timm", "torchvision", "models", "stages", *HELPERS - {"config"}},
    "stages": {"prefect", "prefect_dask", "pipeline"},
    "models": {"prefect", "dvc", "dvclive", "shards", "stages", "pipeline", "yaml", "pyarrow", "PIL", *HELPERS},
    "shards": {"torch", "timm", "torchvision", "prefect", "models", "stages", "pipeline", *HELPERS},
    **{helper: {"stages", "pipeline", "prefect"} for helper in HELPERS},
}
# models/ is pure (DESIGN.md §2): torch, timm, numpy and the standard library's pure helpers, no file or network I/O;
# weights are read by training/weights.py.
MODELS_MAY_IMPORT = {"__future__", "abc", "collections", "copy", "dataclasses", "enum", "functools", "itertools",
                     "math", "numbers", "operator", "types", "typing", "numpy", "timm", "torch", "models"}
IO_CALLS = {"open", "torch.load", "torch.save", "torch.hub.load", "read_text", "read_bytes", "write_text",
            "write_bytes", "load_file", "save_file", "create_connection"}
# Layers whose whole import closure must load without torch: pipeline/ runs where torch is not installed.
TORCH_FREE = ("config", "shards", "pipeline")
TORCH = {"torch", "timm", "torchvision"}


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
            if "__pycache__" not in p.parts}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {n for n in imported_names(path) if n in modules and n != name} for name, path in modules.items()}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = {n.split(".")[0] for n in imported_names(path)} & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "layer rule broken (DESIGN.md §2):\n" + "\n".join(bad)


def test_models_import_only_torch_timm_numpy_and_pure_stdlib():
    bad = []
    for path in sorted((ROOT / "models").rglob("*.py")):
        wrong = {n.split(".")[0] for n in imported_names(path)} - MODELS_MAY_IMPORT
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "models/ must stay pure torch (DESIGN.md §2):\n" + "\n".join(bad)


def called_names(path: Path) -> set[str]:
    """Dotted names of everything called in ``path`` (``torch.load``, ``open``, ``p.read_text`` as ``read_text``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            names.update({".".join(reversed(parts)), parts[0]} if parts else set())
    return names


def test_models_do_no_file_or_network_io():
    bad = [f"{path.relative_to(ROOT)} calls {sorted(called_names(path) & IO_CALLS)}"
           for path in sorted((ROOT / "models").rglob("*.py")) if called_names(path) & IO_CALLS]
    assert not bad, "models/ reads no files (training/weights.py does):\n" + "\n".join(bad)


def test_io_call_checker_catches_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import torch\ndef f(p):\n    return torch.load(p, weights_only=True), open(p).read()\n")
    assert {"torch.load", "open"} <= called_names(f) & IO_CALLS


def test_no_stage_imports_another_stage():
    edges = [(a, b) for a, targets in graph().items() if a.startswith("stages.")
             for b in targets if b.startswith("stages.")]
    assert not edges, f"a stage imports another stage: {edges}"


def test_stages_holds_only_dvc_entry_points():
    dvc_yaml = (ROOT / "dvc.yaml").read_text()
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert modules, "no stage modules found"
    loose = [m for m in modules if f"python -m stages.{m} " not in dvc_yaml]
    assert not loose, f"stages/ modules that dvc.yaml does not run: {loose}"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_layers_stay_torch_free_through_their_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = module_name(path)
        closure = import_closure(name) if module_path(name) else [path]  # pipeline is not a code folder
        if package == "pipeline":
            closure = sorted({path, *[f for n in imported_names(path) if module_path(n)
                                      for f in import_closure(n)]})
        for file in closure:
            heavy = {n.split(".")[0] for n in imported_names(file)} & TORCH
            if heavy:
                bad.append(f"{path.relative_to(ROOT)} -> {file.relative_to(ROOT)} imports {sorted(heavy)}")
    assert not bad, "torch reached from a torch-free layer:\n" + "\n".join(bad)


def test_checker_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    import torch.nn as nn\n    from models.toco import ToCo\n")
    assert {"torch.nn", "models.toco"} <= imported_names(f)
