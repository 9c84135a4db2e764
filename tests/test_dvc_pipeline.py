"""The DAG under the real `dvc repro`, on the tiny preset, in a temporary git repository.

One `dvc repro` of the whole DAG per session (the ``trained_project`` fixture of conftest.py): the tests that read
use it as it is; the tests that change params or run experiments work on a private copy (``trained_copy``).
"""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run

pytestmark = pytest.mark.slow

UPSTREAM_OF_REFINE = {"shapes", "prepare", "train_classifier", "dump_cams"}


def stages_run(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_runs_every_stage_then_is_a_no_op(trained_project):
    project, out = trained_project.root, trained_project.repro_stdout
    for stage in ("shapes", "prepare", "train_classifier", "dump_cams", "refine", "train_segmenter", "evaluate"):
        assert f"Running stage '{stage}'" in out, out[-2000:]
    prepared = json.loads((project / "metrics/prepare.json").read_text())
    assert prepared["images"] == {"train": 24, "val": 8} and prepared["rejects"] == 0
    assert pq.read_table(project / "data/manifest/train-00000.parquet").num_rows == 16
    classifier = json.loads((project / "metrics/classifier.json").read_text())
    assert {"f1", "cam_miou", "cam_threshold"} <= set(classifier)
    assert (project / "data/classifier/model.safetensors").exists()
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "cam_miou" in shown and "rejects" in shown

    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout
    status = run(["dvc", "status", "--json"], project).stdout
    assert json.loads(status) == {}


def test_the_summary_make_demo_ends_with_reads_the_project(trained_project):
    import sys

    out = run([sys.executable, "-m", "pipeline", "summary"], trained_project.root).stdout
    classifier = json.loads((trained_project.root / "metrics/classifier.json").read_text())
    assert f"val F1 {classifier['f1']:.3f}" in out and "not run yet" not in out, out
    assert "data/export: train" in out and "review.html" in out


def test_dvc_repro_through_evaluate_writes_the_segmenter_metrics_and_plots(trained_project):
    project = trained_project.root
    segmenter = json.loads((project / "metrics/segmenter.json").read_text())
    assert {"miou", "miou_ms_flip_crf", "miou_ms_flip", "per_class"} <= set(segmenter)
    assert segmenter["images"] == 8 and 0.0 <= segmenter["miou_ms_flip_crf"] <= 100.0
    assert (project / "data/segmenter/model.safetensors").exists()
    assert (project / "dvclive/train_segmenter/plots/metrics/val/miou.tsv").exists()
    assert len(list((project / "metrics/segmenter_overlays").glob("*.png"))) == 2
    assert (project / "metrics/segmenter_confusion.csv").read_text().startswith("actual,predicted\n")
    assert "miou_ms_flip_crf" in run(["dvc", "metrics", "show", "--json"], project).stdout
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert "metrics/segmenter_confusion.csv" in plots
    assert "dvclive/train_segmenter/plots/metrics/train/loss_total.tsv" in plots


def test_changing_a_prepare_param_reruns_prepare_and_what_follows_only(trained_copy):
    project = trained_copy
    # `dvc exp run <target>` runs prepare (and shapes, were it changed); `dvc status` then names what follows
    out = run(["dvc", "exp", "run", "-S", "prepare.rows_per_shard=8", "prepare"], project)
    assert "Running stage 'shapes'" not in out.stdout
    assert "Running stage 'prepare'" in out.stdout
    assert pq.read_table(project / "data/manifest/train-00000.parquet").num_rows == 8
    changed = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert {"train_classifier", "dump_cams"} <= set(changed), changed
    assert not {"shapes", "prepare"} & set(changed), changed


def test_a_refine_change_reruns_only_what_follows_then_the_seed_options_in_one_exp_run(trained_copy):
    project = trained_copy
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["refine"]["ignore_band"] = False  # other masks for certain: no 255 band
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "refine" in changed and not UPSTREAM_OF_REFINE & set(changed)
    again = run(["dvc", "repro"], project).stdout
    ran = stages_run(again)
    assert {"refine", "train_segmenter", "evaluate"} <= ran, again[-2000:]
    assert not UPSTREAM_OF_REFINE & ran, again[-2000:]

    # The seed-method options (AFA, APC, TRT) with one `dvc exp run -S ...`: classifier, CAMs and refine rerun, and
    # the CAM shards carry the fg map and the affinity that refine's fg_prior and random_walk read.
    # (up to refine: that what follows a refine change reruns is asserted above)
    exp = run(["dvc", "exp", "run", "-S", "train_classifier.model.use_afa=true",
               "-S", "train_classifier.model.use_trt=true", "-S", "train_classifier.model.pooling=akp",
               "-S", "train_classifier.loss.use_pcl=true", "-S", "refine.methods=[fg_prior,random_walk,par,crf]",
               "refine"], project).stdout
    ran = stages_run(exp)
    assert {"train_classifier", "dump_cams", "refine"} <= ran, exp[-2000:]
    assert not {"train_segmenter", "evaluate"} & ran, exp[-2000:]
    row = pq.read_table(project / "data/cams/train-00000.parquet").slice(0, 1).to_pylist()[0]
    assert row["fg"] is not None and row["affinity"] is not None
    pseudo = json.loads((project / "metrics/pseudo_labels.json").read_text())
    assert pseudo["methods"] == ["fg_prior", "random_walk", "par", "crf"]
    assert "seconds_per_step" in json.loads((project / "metrics/classifier.json").read_text())


def test_imported_corrections_rerun_only_their_shards_and_reach_the_package(trained_copy):
    """`python -m pipeline corrections data/export <folder>` then `dvc repro`: refine recomputes the shard holding
    the corrected images, export / train_segmenter / evaluate follow, and the package carries them as corrected."""
    import sys

    from shards.images import decode_mask_png

    project = trained_copy
    shard = sorted((project / "data/pseudo_labels").glob("train-*.parquet"))[-1]
    manifest = {r["image_id"]: r for r in pq.read_table(project / "data/manifest" / shard.name).to_pylist()}
    chosen = sorted(manifest)[:2]
    folder = project / "cvat-export" / "SegmentationClass"
    folder.mkdir(parents=True)
    for image_id in chosen:  # the ground truth stands for a human's correction
        (folder / f"{image_id}.png").write_bytes(manifest[image_id]["mask"]["bytes"])
    (folder / "not-an-image-of-ours.png").write_bytes(manifest[chosen[0]]["mask"]["bytes"])
    done = run([sys.executable, "-m", "pipeline", "corrections", "data/export", "cvat-export"], project)
    assert "2 masks imported" in done.stdout and "rejected" in done.stderr, done.stdout + done.stderr
    assert (project / "data/corrections/dataset.dvc").is_file()
    changed = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "refine" in changed and not UPSTREAM_OF_REFINE & set(changed), changed

    again = run(["dvc", "repro"], project)
    ran = stages_run(again.stdout)
    assert {"refine", "export", "train_segmenter", "evaluate"} <= ran and not UPSTREAM_OF_REFINE & ran, ran
    shards = len(list((project / "data/pseudo_labels").glob("*.parquet")))
    assert f"in 1 shards ({shards - 1} reused)" in again.stdout + again.stderr
    package = [r for f in sorted((project / "data/export/data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    corrected = {r["image_id"]: r for r in package if r["provenance"] == "corrected"}
    assert sorted(corrected) == chosen
    for image_id in chosen:
        assert (decode_mask_png(corrected[image_id]["mask"]["bytes"])
                == decode_mask_png(manifest[image_id]["mask"]["bytes"])).all()
    metrics = json.loads((project / "metrics/pseudo_labels.json").read_text())
    assert metrics["corrected_images"] == 2 and "uncorrected" in metrics
