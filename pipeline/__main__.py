"""``python -m pipeline <command>``: register collections, run the flows, serve the deployments.

    python -m pipeline register <folder or fsspec URL> [--name NAME]   a new collection (relabel@NAME in dvc.yaml)
    python -m pipeline collections                                     registered collections and their versions
    python -m pipeline summary                                         each stage's headline figures
    python -m pipeline server                                          the project's Prefect server (api_url)
    python -m pipeline serve                                           the deployments, on the project's server
    python -m pipeline produce [STAGE ...]                             the training DAG as a flow run
    python -m pipeline relabel NAME                                    one collection as a flow run
    python -m pipeline inbox                                           one relabel-inbox flow run, now
    python -m pipeline corrections <data/export or NAME> <folder>      import corrected masks (versioned by DVC)
    python -m pipeline deps [--check]                                  dvc.yaml code deps from the import graph
    python -m pipeline params [--check] [FILE ...]                     params comments from the schema's help
    python -m pipeline preset NAME [--out FILE]                        write a preset (config/presets/) as params

Run from the repository root (``--root`` otherwise). ``serve``, ``produce``, ``relabel`` and ``inbox`` talk to the
project's Prefect server, ``PREFECT_API_URL`` when set, else ``orchestration.api_url``: start it in another terminal
with ``make server`` (``python -m pipeline server``); without one they stop with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from config.loader import ParamsError, load_section
from config.schema import OrchestrationConfig
from shards.collections import read_collections, read_current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="repository root (default: the current folder)")
    commands = parser.add_subparsers(dest="command", required=True)
    reg = commands.add_parser("register", help="register a folder of images as a collection")
    reg.add_argument("path", help="a folder, or any fsspec URL of one (s3://..., memory://...)")
    reg.add_argument("--name", help="collection name (default: from the folder name)")
    commands.add_parser("collections", help="list the registered collections and their current versions")
    commands.add_parser("summary", help="the headline figures of each stage (what `make demo` ends with)")
    commands.add_parser("server", help="start the project's Prefect server (at orchestration.api_url)")
    commands.add_parser("serve", help="serve the deployments (needs the project's Prefect server)")
    prod = commands.add_parser("produce", help="run the training DAG as a flow")
    prod.add_argument("stages", nargs="*", help="stages to run (default: all, in dependency order)")
    one = commands.add_parser("relabel", help="relabel one collection as a flow")
    one.add_argument("name")
    commands.add_parser("inbox", help="run relabel-inbox once, now")
    fix = commands.add_parser("corrections", help="import corrected masks (CVAT / Label Studio export: VOC PNGs or "
                                                  "COCO JSON) for a package or a collection")
    fix.add_argument("target", help="the package folder (data/export) or a collection name")
    fix.add_argument("folder", help="the exported masks")
    deps = commands.add_parser("deps", help="regenerate dvc.yaml's code deps from the import graph")
    deps.add_argument("--check", action="store_true", help="only check; exit 1 when dvc.yaml is out of date")
    docs = commands.add_parser("params", help="rewrite params files' key comments from the schema's help texts")
    docs.add_argument("files", nargs="*", help="params files (default: params.yaml and every preset)")
    docs.add_argument("--check", action="store_true", help="only check; exit 1 when a file differs")
    preset = commands.add_parser("preset", help="apply a preset: write config/presets/NAME.yaml as params.yaml")
    preset.add_argument("name", nargs="?", help="preset name; none = list them")
    preset.add_argument("--out", default="params.yaml", help="params file to write (default: params.yaml)")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    if args.command == "deps":
        from pipeline import codedeps

        return codedeps.main(args.check, root / "dvc.yaml")
    if args.command == "summary":
        from pipeline import summary

        return summary.main(root)
    if args.command == "params":
        from pipeline import params_files

        return params_files.document(root, [Path(f) for f in args.files], check=args.check)
    if args.command == "preset":
        from pipeline import params_files

        return params_files.apply_preset(root, args.name, root / args.out)
    try:
        cfg = load_section(OrchestrationConfig, root / "params.yaml", "orchestration")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "register":
        from pipeline.collections import register

        try:
            register(root, args.path, args.name, cfg.inbox)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "corrections":
        from pipeline import corrections

        return corrections.run(root, args.target, args.folder, cfg.collections_dir)
    if args.command == "collections":
        for name in read_collections(root):
            current = read_current(root / cfg.collections_dir, name) or {}
            summary = current.get("summary") or {}
            print(json.dumps({"collection": name, "version": current.get("version"), "images": summary.get("images"),
                              "predicted": summary.get("predicted"), "rejects": summary.get("rejects")}))
        return 0
    from pipeline.serve import serve, server_answers, server_command, use_project_server

    api_url = use_project_server(cfg)  # PREFECT_API_URL, exported before anything imports prefect
    if args.command == "server":
        if server_answers(api_url):
            print(f"a Prefect server already answers at {api_url}", file=sys.stderr)
            return 0
        try:
            command = server_command(api_url)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: its telemetry only errors
        os.execv(sys.executable, [sys.executable, "-m", *command])
    if not server_answers(api_url):
        print(f"error: no Prefect server answers at {api_url}: run `make server` in another terminal "
              f"(or set PREFECT_API_URL / orchestration.api_url)", file=sys.stderr)
        return 2
    if args.command == "serve":
        print(f"serving against {api_url}; the UI is at {api_url.removesuffix('/api')}", flush=True)
        serve(root, cfg)
        return 0
    from pipeline import flows

    if args.command == "produce":
        flows.produce(str(root), args.stages or None)
    elif args.command == "relabel":
        flows.relabel(args.name, str(root))
    else:
        flows.relabel_inbox(str(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
