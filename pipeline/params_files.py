"""Params files from the command line: comments from the schema, and presets (config/presets/*.yaml).

    python -m pipeline params [--check] [FILE ...]   key comments of params.yaml and the presets = the schema's help
    python -m pipeline preset                        list the presets
    python -m pipeline preset NAME [--out FILE]      check config/presets/NAME.yaml and write it as params.yaml

A preset is a whole params file (every key named): applying one replaces ``params.yaml`` (the old one is kept as
``params.yaml.bak``), so ``dvc repro`` then runs that setting and ``git diff params.yaml`` shows what changed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from config.document import annotate, missing_keys
from config.loader import ParamsError
from config.schema import PRESETS_DIR, Params, load_params


def presets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.yaml"))}


def document(root: Path, files: list[Path], *, check: bool) -> int:
    """Rewrite (or check) the key comments of ``files`` (default: params.yaml and every preset)."""
    files = files or [root / "params.yaml", *presets().values()]
    stale = []
    for path in files:
        try:
            load_params(path)
        except ParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        text = path.read_text(encoding="utf-8")
        missing = missing_keys(text, Params)
        if missing:
            print(f"{path}: does not name {len(missing)} key(s) of the schema: {', '.join(missing[:8])}")
            stale.append(path)
            continue
        new = annotate(text, Params)
        if new == text:
            continue
        if check:
            print(f"{path}: key comments differ from the schema's help (run `python -m pipeline params`)")
            stale.append(path)
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)
            print(f"{path}: comments rewritten from the schema")
    return 1 if stale else 0


def apply_preset(root: Path, name: str | None, out: Path) -> int:
    available = presets()
    if not name:
        for preset, path in available.items():
            title = next((line[2:] for line in path.read_text().splitlines() if line.startswith("# ")), "")
            print(f"{preset:16s} {title}")
        return 0
    if name not in available:
        print(f"error: no preset {name!r} (have: {', '.join(available)})", file=sys.stderr)
        return 2
    try:
        load_params(available[name])  # a broken preset never replaces a working params.yaml
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"error: {out.parent}: no such folder", file=sys.stderr)
        return 2
    backup = out.with_name(out.name + ".bak")
    if out.exists():
        shutil.copyfile(out, backup)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(available[name], tmp)
    tmp.replace(out)
    kept = f" (the previous one is {backup.name})" if backup.exists() else ""
    print(f"{out}: preset {name} applied{kept}; `dvc repro` runs it")
    return 0
