"""Throughput of dump_cams and refine on CPU, on a generated shapes set; peak memory of dump_cams vs dataset size.

    python bench/bench_refine.py [--images 64] [--threads 1] [--workers 1 2]

Builds a shapes manifest (default sizes 160-288 px, 16 rows per shard), a randomly initialised classifier with the
CPU default architecture of params.yaml (``train_classifier``; random weights time the same as trained ones), dumps
CAMs with the default ``dump_cams`` params, then times ``refine`` for the chains par, crf and par+crf with 1 and 2
processes. Peak memory (VmHWM, see ``peak_rss_mib``) of dump_cams is measured in fresh processes for N and 4N images: shards
stream, so it must not grow with N. (``--memory-only`` skips the timings.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.schema import Params, PrepareConfig, RuntimeConfig, ShapesConfig, load_params  # noqa: E402
from shards.manifest import read_classes  # noqa: E402
from stages import dump_cams, prepare, refine, shapes  # noqa: E402

SHIPPED = load_params(ROOT / "params.yaml")  # the CPU preset: the architecture and settings measured


def build(root: Path, images: int) -> tuple[Path, Path]:
    import torch

    from training.checkpoint import save_weights
    from training.classifier_model import build_classifier, config_to_json, toco_config

    shapes.run(ShapesConfig(num_train=images, num_val=1), root / "shapes", progress=False)
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=16), root / "manifest", progress=False)
    names = read_classes(root / "manifest")["class_names"]
    cfg = toco_config(SHIPPED.train_classifier, len(names) - 1)
    torch.manual_seed(0)
    save_weights(build_classifier(cfg), root / "classifier", config_to_json(cfg, names))
    return root / "manifest", root / "classifier"


def dump(root: Path, manifest: Path, classifier: Path, threads: int) -> dict:
    params = Params(runtime=RuntimeConfig(num_threads=threads), dump_cams=dataclasses.replace(
        SHIPPED.dump_cams, splits=("train",)))
    return dump_cams.run(params, manifest, classifier, root / "cams", progress=False)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). ``getrusage().ru_maxrss`` is kept across fork + exec, so in a
    child of a big parent it reports the parent's peak; VmHWM belongs to the current address space only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux


def memory_child(root: Path, threads: int) -> None:
    """Runs in a fresh process on a built ``root``: peak RSS (MiB) after the imports and after the dump, as JSON."""
    baseline = peak_rss_mib()
    result = dump(root, root / "manifest", root / "classifier", threads)
    print(json.dumps({"images": result["images"], "peak_rss_mib": peak_rss_mib(), "after_imports_mib": baseline}))


def timings(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, classifier = build(root, args.images)
        result = dump(root, manifest, classifier, args.threads)
        print(f"dump_cams: {result['images']} images in {result['seconds']:.1f} s = "
              f"{result['images'] / result['seconds']:.1f} images/s (CPU, {args.threads} thread(s), "
              f"image_size {SHIPPED.dump_cams.image_size}, scales {list(SHIPPED.dump_cams.scales)})")
        print("\n| methods | processes | images/s | seconds |\n| --- | --- | --- | --- |")
        for methods in (("par",), ("crf",), ("par", "crf")):
            for workers in args.workers:
                params = Params(runtime=RuntimeConfig(num_threads=args.threads, num_workers=workers),
                                refine=dataclasses.replace(SHIPPED.refine, methods=methods))
                out = root / f"pseudo-{'-'.join(methods)}-{workers}"
                started = time.perf_counter()
                done = refine.run(params, root / "cams", manifest, out, progress=False)
                seconds = time.perf_counter() - started
                print(f"| {'+'.join(methods)} | {workers} | {done['images'] / seconds:.2f} | {seconds:.1f} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory measurement")
    parser.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.threads)
        return
    if not args.memory_only:
        timings(args)
    print("\ndump_cams peak memory (a fresh process per dataset size):")
    for images in (args.images // 2, 2 * args.images):
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), images)
            out = subprocess.run([sys.executable, __file__, "--memory-child", tmp, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            print(" ", out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
