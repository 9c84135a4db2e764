"""Ablation table of the seed and refinement methods, on the dataset that ``params.yaml`` points at.

    python bench/ablation.py --out /tmp/ablation            # every variant: about 2.5 h on a 2-core CPU (embedded default)
    python bench/ablation.py --out /tmp/ablation --only afa   # one classifier variant (repeat --only for more)
    python bench/ablation.py --out /tmp/ablation --from-dvc   # ToCo's classifier and CAMs from `dvc repro`
    python bench/ablation.py --out /tmp/seed1 --seed 1 --only toco --only afa --chain par+crf  # a seed repeat

Classifier variants (``train_classifier`` overrides; METHODS.md §1-3): ToCo as in ``params.yaml``; ToCo with the
plain or the reference views (``augment``: ``PLAIN_VIEWS``, ``REFERENCE_VIEWS``), each without and with the dense
CRF energy regulariser (``loss.crf_energy.weight`` 0 / 0.05): ``toco_plain_views``, ``toco_reference_views``,
``toco_plain_views_energy``, ``toco_reference_views_energy``; the plain
ViT-CAM baseline (no auxiliary head, no PTC, no CTC, no segmentation head); ``afa`` (affinity head, refined with
``random_walk``); ``apc`` (Adaptive-K pooling + patch contrast); ``trt`` (re-attention foreground map, refined with
``fg_prior``). For each the script trains the classifier, dumps its CAMs, and refines them with each method chain,
running the stages' own command lines with a params file per run (``params.yaml`` + overrides), so each row is what
``dvc exp run -S ...`` with the same overrides gives. A step whose metrics file exists is not rerun: a killed run
continues. Prints a Markdown table (CAM mIoU on ``dump_cams.eval_split``, pseudo-label mIoU / coverage /
precision / recall on ``refine.eval_splits``, the classifier's seconds per training step) and writes it to
``<out>/ablation.md``. The manifest must exist (``dvc repro prepare``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# ToCo's views (train_classifier.augment, training/views.py): the reference's pipeline, and the plain one of
# earlier runs (colour jitter of the crop in the loader, the second view cut from the training crop, nothing else).
REFERENCE_VIEWS = {"jitter": 0.0, "main_colour": True, "main_flip_p": 0.5, "main_blur_p": 1.0,
                   "second_view": "original", "local_colour": True, "local_flip_p": 0.5, "local_blur_p": 0.5}
PLAIN_VIEWS = {"jitter": 0.3, "main_colour": False, "main_flip_p": 0.0, "main_blur_p": 0.0, "second_view": "crop",
               "local_colour": False, "local_flip_p": 0.0, "local_blur_p": 0.0}
ENERGY = {"crf_energy": {"weight": 0.05}}  # the reference's dense CRF energy regulariser (models/energy.py)
NO_ENERGY = {"crf_energy": {"weight": 0.0}}

VARIANTS: dict[str, dict] = {
    "toco": {},
    "toco_plain_views": {"augment": PLAIN_VIEWS, "loss": NO_ENERGY},
    "toco_reference_views": {"augment": REFERENCE_VIEWS, "loss": NO_ENERGY},
    "toco_plain_views_energy": {"augment": PLAIN_VIEWS, "loss": ENERGY},
    "toco_reference_views_energy": {"augment": REFERENCE_VIEWS, "loss": ENERGY},
    "vit_cam": {"model": {"use_aux": False, "use_ctc": False, "use_seg_head": False}, "loss": {"use_ptc": False}},
    "afa": {"model": {"use_afa": True}},
    "apc": {"model": {"pooling": "akp"}, "loss": {"use_pcl": True}},
    "trt": {"model": {"use_trt": True}},
}
# A chain is refine.methods, or a dict of refine overrides with its methods (other thresholds, ...).
CHAINS: dict[str, list[list[str] | dict]] = {
    "toco": [[], ["par"], ["crf"], ["par", "crf"]],
    **{name: [[], ["par", "crf"]] for name in ("toco_plain_views", "toco_reference_views", "toco_plain_views_energy",
                                               "toco_reference_views_energy")},
    "vit_cam": [[], ["par", "crf"]],
    "afa": [["par", "crf"], ["random_walk"], ["random_walk", "par", "crf"],
            {"methods": ["random_walk", "par", "crf"],
             "thresholds": {"high": 0.55, "low": 0.35}}],  # AFA's own thresholds
    "apc": [[], ["par", "crf"]],
    "trt": [[], ["par", "crf"], ["fg_prior"], {"methods": ["fg_prior"], "fg_power": 0.25}, ["fg_prior", "par", "crf"],
            {"methods": ["fg_prior", "par", "crf"], "fg_power": 0.25}],
}


CHAIN_FILTER: set[str] = set()  # --chain: refine runs to keep, by tag (cam, par+crf, random_walk+par+crf, ...)
SEED: int | None = None  # --seed: runtime.seed of every run (data order, augmentation, initialisation)


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` merged into ``base``, nested sections key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def write_params(path: Path, classifier: dict, refine: dict | None = None) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if SEED is not None:
        params["runtime"]["seed"] = SEED
    merge(params["train_classifier"], classifier)
    merge(params["refine"], refine or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def step(args: list[str], done: Path, log: Path) -> float | None:
    """Run ``python -m <args>`` unless ``done`` exists; seconds taken (None when skipped)."""
    if done.exists():
        return None
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def reuse_dvc_outputs(work: Path) -> None:
    """The ToCo variant is the DAG's own classifier and CAMs (``dvc repro dump_cams`` with params.yaml)."""
    work.mkdir(parents=True, exist_ok=True)
    for target, source in (("classifier", "data/classifier"), ("cams", "data/cams"),
                           ("classifier.json", "metrics/classifier.json"), ("cams.json", "metrics/cams.json")):
        if not (ROOT / source).exists():
            raise SystemExit(f"--from-dvc: {source} is missing; run `dvc repro dump_cams` first")
        if not (work / target).exists():
            (work / target).symlink_to(ROOT / source)


def run_variant(name: str, out: Path, manifest: Path, times: dict, from_dvc: bool = False) -> list[dict]:
    work = out / name
    if from_dvc and name == "toco":
        reuse_dvc_outputs(work)
    params = write_params(work / "params.yaml", VARIANTS[name])
    t = step(["stages.train_classifier", "--params", str(params), "--manifest", str(manifest), "--out",
              str(work / "classifier"), "--checkpoints", str(work / "checkpoints"), "--metrics",
              str(work / "classifier.json"), "--live", str(work / "dvclive")], work / "classifier.json",
             work / "train_classifier.log")
    times.setdefault(name, {})["train_classifier"] = t
    t = step(["stages.dump_cams", "--params", str(params), "--manifest", str(manifest), "--classifier",
              str(work / "classifier"), "--out", str(work / "cams"), "--metrics", str(work / "cams.json")],
             work / "cams.json", work / "dump_cams.log")
    times[name]["dump_cams"] = t
    classifier = json.loads((work / "classifier.json").read_text())
    cams = json.loads((work / "cams.json").read_text())
    rows = []
    for spec in CHAINS[name]:
        overrides = dict(spec) if isinstance(spec, dict) else {"methods": spec}
        chain = overrides["methods"]
        extra = {k: v for k, v in overrides.items() if k != "methods"}
        tag = "+".join(chain) or "cam"
        flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2 if isinstance(v, dict) else v
                for k, v in extra.items() for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)])}
        tag += "".join(f"_{k.rsplit('.', 1)[-1]}{v}" for k, v in sorted(flat.items()))
        if CHAIN_FILTER and tag not in CHAIN_FILTER:
            continue
        run_dir = work / f"refine_{tag}"
        run_params = write_params(run_dir / "params.yaml", VARIANTS[name], {**overrides, "overlays": 0})
        t = step(["stages.refine", "--params", str(run_params), "--cams", str(work / "cams"), "--manifest",
                  str(manifest), "--out", str(run_dir / "pseudo_labels"), "--metrics",
                  str(run_dir / "pseudo_labels.json"), "--overlays", str(run_dir / "overlays")],
                 run_dir / "pseudo_labels.json", run_dir / "refine.log")
        times[name][f"refine {tag}"] = t
        pseudo = json.loads((run_dir / "pseudo_labels.json").read_text())
        label = "[" + ", ".join(chain) + "]" + "".join(f" {k} {v}" for k, v in sorted(extra.items()))
        rows.append({"classifier": name, "methods": label, "f1": classifier.get("f1"),
                     "step_s": classifier.get("seconds_per_step"),
                     "cam_miou": cams.get("miou"), "cam_best": cams.get("best_miou"),
                     "cam_best_threshold": cams.get("best_threshold"), "miou": pseudo.get("miou"),
                     "coverage": pseudo.get("coverage"), "precision": pseudo.get("precision"),
                     "recall": pseudo.get("recall")})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| classifier | refine.methods | val F1 | CAM mIoU at bkg (best at t), dump_cams.eval_split | pseudo-label "
             "mIoU | coverage | precision | recall | s/step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['classifier']} | `{r['methods']}` | {r['f1']} | {r['cam_miou']} ({r['cam_best']} @ "
                     f"{r['cam_best_threshold']}) | {r['miou']} | {r['coverage']} | {r['precision']} | "
                     f"{r['recall']} | {r.get('step_s') or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (kept: reruns skip finished steps)")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "manifest")
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append", help="variants to run (default all)")
    parser.add_argument("--from-dvc", action="store_true",
                        help="take the ToCo classifier and CAMs from the DAG's outputs (dvc status must be clean)")
    parser.add_argument("--seed", type=int, help="runtime.seed of every run (repeat a variant with other seeds)")
    parser.add_argument("--chain", action="append", default=[],
                        help="only these refine runs, by tag: cam, par, crf, par+crf, random_walk+par+crf, ...")
    args = parser.parse_args()
    global SEED
    SEED = args.seed
    CHAIN_FILTER.update(args.chain)
    if args.from_dvc and args.seed is not None:
        raise SystemExit("--from-dvc reuses the DAG's classifier (params.yaml's seed); drop it with --seed")
    if not (args.manifest / "classes.json").exists():
        raise SystemExit(f"{args.manifest}: no manifest; run `dvc repro prepare` first")
    times: dict = {}
    rows = []
    for name in args.only or list(VARIANTS):
        rows += run_variant(name, args.out.resolve(), args.manifest.resolve(), times, args.from_dvc)
    text = table(rows)
    seconds = "\n".join(f"- {name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items() if v is not None)
                        for name, stages in times.items())
    report = f"{text}\n\nSeconds per stage (this run; skipped steps not listed):\n{seconds}\n"
    (args.out / "ablation.md").write_text(report)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    print(report)


if __name__ == "__main__":
    main()
