"""The code deps of every ``dvc.yaml`` stage, generated from the import graph (DESIGN.md §2).

A stage's command runs ``python -m stages.<name>``; its code deps are the files of that module's import closure
(``shards.fingerprint.import_closure``, the same set its resume fingerprint hashes), written as folders where a
whole folder is imported and as files elsewhere. So an edit reruns exactly the stages that import the edited
file, and nothing a stage imports is left out.

    python -m pipeline deps            rewrite the code entries of dvc.yaml's deps lists (data deps are kept)
    python -m pipeline deps --check    exit 1, naming the stages, when dvc.yaml differs from the import graph

The rewrite is textual (comments and layout stay): in each stage's ``deps:`` list, the entries under the code
folders are replaced by the generated ones, after the data entries.
"""

from __future__ import annotations

import re
from pathlib import Path

from shards.fingerprint import CODE_FOLDERS, PROJECT_ROOT, import_closure

_CMD_MODULE = re.compile(r"python -m (stages\.\w+)")


def _source_files(folder: Path) -> set[Path]:
    """The ``*.py`` files under ``folder`` that hold code (an empty ``__init__.py`` holds none)."""
    return {p for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts and not (p.name == "__init__.py" and p.stat().st_size == 0)}


def covering_deps(files: list[Path], root: Path = PROJECT_ROOT) -> list[str]:
    """``files`` as DVC dep paths: a folder when every source file under it is in ``files``, else its files."""
    wanted = set(files)
    out: list[str] = []

    def walk(folder: Path) -> None:
        everything = _source_files(folder)
        if everything and everything <= wanted:
            out.append(folder.relative_to(root).as_posix())
            return
        for path in sorted(folder.iterdir()):
            if path.is_dir() and path.name != "__pycache__":
                walk(path)
            elif path in wanted and path.parent == folder:
                out.append(path.relative_to(root).as_posix())

    for name in CODE_FOLDERS:
        if (root / name).is_dir() and any(p.is_relative_to(root / name) for p in wanted):
            walk(root / name)
    return out


def is_code_dep(entry: str) -> bool:
    return entry.split("/")[0] in CODE_FOLDERS


def stage_deps(module: str) -> list[str]:
    """The generated code deps of the stage whose command runs ``python -m <module>`` (empty package
    ``__init__.py`` files left out: one that gains code makes ``deps --check`` fail until they are regenerated)."""
    files = [p for p in import_closure(module) if not (p.name == "__init__.py" and p.stat().st_size == 0)]
    return covering_deps(files)


def covered(entries: list[str], root: Path = PROJECT_ROOT) -> set[Path]:
    """The source files a list of DVC dep entries covers."""
    files: set[Path] = set()
    for entry in entries:
        path = root / entry
        if path.is_dir():
            files |= _source_files(path)
        elif path.suffix == ".py":
            files.add(path)
    return files


def _blocks(lines: list[str]) -> list[tuple[str, int, int, int]]:
    """(stage module, first line of the deps items, end line, item indent) for every stage with deps."""
    found, module = [], None
    for i, line in enumerate(lines):
        command = _CMD_MODULE.search(line)
        if command:
            module = command.group(1)
        stripped = line.strip()
        if stripped == "deps:" and module:
            indent = None
            j = i + 1
            while j < len(lines):
                item = lines[j]
                if item.strip().startswith("- "):
                    current = len(item) - len(item.lstrip())
                    indent = current if indent is None else indent
                    if current != indent:
                        break
                    j += 1
                    continue
                break
            found.append((module, i + 1, j, indent or 0))
            module = None
    return found


def generate(text: str) -> str:
    """``dvc.yaml`` text with every stage's code deps regenerated."""
    lines = text.splitlines(keepends=True)
    for module, start, end, indent in reversed(_blocks(lines)):
        items = [line.strip()[2:].strip() for line in lines[start:end]]
        data = [item for item in items if not is_code_dep(item)]
        entries = data + stage_deps(module)
        lines[start:end] = [f"{' ' * indent}- {entry}\n" for entry in entries]
    return "".join(lines)


def stale_stages(text: str) -> list[str]:
    """Stage modules whose code deps in ``text`` differ from the import graph."""
    lines = text.splitlines(keepends=True)
    stale = []
    for module, start, end, _ in _blocks(lines):
        items = [line.strip()[2:].strip() for line in lines[start:end]]
        if [i for i in items if is_code_dep(i)] != stage_deps(module):
            stale.append(module)
    return stale


def main(check: bool, path: Path = PROJECT_ROOT / "dvc.yaml") -> int:
    text = path.read_text(encoding="utf-8")
    if check:
        stale = stale_stages(text)
        if stale:
            print(f"{path}: code deps out of date for {', '.join(stale)}; run `python -m pipeline deps`")
            return 1
        print(f"{path}: code deps match the import graph")
        return 0
    new = generate(text)
    if new != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(path)
        print(f"{path}: code deps regenerated")
    else:
        print(f"{path}: code deps already match the import graph")
    return 0
