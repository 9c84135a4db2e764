"""refine on CAMs of a tiny random ToCo: the chains, the labelling rule, 1 vs 2 processes, resume, schema, metrics."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("pydensecrf.densecrf")

from config.schema import BoxConfig, CrfConfig, DumpCamsParams, Params, RefineParams, RuntimeConfig  # noqa: E402
from labelling.pseudo_labels import PIECES_PER_WORKER, ShardTask, split_tasks  # noqa: E402
from models.configs import ParConfig, ThresholdConfig  # noqa: E402
from models.pseudo import online_pseudo_labels  # noqa: E402
from refinement.chain import refine_chunk  # noqa: E402
from refinement.crf import crf_two_thresholds  # noqa: E402
from shards.boxes import mask_boxes  # noqa: E402
from shards.cams import decode_cams  # noqa: E402
from shards.io import ShardSet, read_metadata  # noqa: E402
from shards.pseudo_labels import read_mask  # noqa: E402
from shards.records import IGNORE_INDEX  # noqa: E402
from stages import dump_cams, refine  # noqa: E402
from tests.stages.test_dump_cams import build_inputs, shard_hashes  # noqa: E402


def make_params(workers=1, **kw) -> Params:
    return Params(runtime=RuntimeConfig(num_threads=1, num_workers=workers), refine=RefineParams(**kw))


def rows_of(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    manifest, classifier = build_inputs(root)
    run_params = Params(runtime=RuntimeConfig(num_threads=1), dump_cams=DumpCamsParams(
        splits=("train", "val"), eval_split="val", image_size=128, cam_size=64, predict_size=96))
    dump_cams.run(run_params, manifest, classifier, root / "cams", progress=False)
    result = refine.run(make_params(), root / "cams", manifest, root / "pseudo", root / "metrics.json",
                        root / "overlays", progress=False)
    return root, manifest, result


def test_default_chain_rows_schema_and_stats(inputs):
    root, manifest, result = inputs
    assert sorted(result["computed"]) == ["train-00000.parquet", "train-00001.parquet", "val-00000.parquet"]
    meta = read_metadata(root / "pseudo" / "train-00000.parquet")
    assert meta["kind"] == "pseudo_labels" and meta["methods"] == ["par", "crf"]
    assert meta["boxes"] == {"min_pixels": RefineParams().boxes.min_pixels,
                             "connectivity": RefineParams().boxes.connectivity}
    assert meta["producer"]["model_fingerprint"] == read_metadata(root / "cams" / "train-00000.parquet")[
        "producer"]["model_fingerprint"]
    hf = json.loads(pq.read_schema(root / "pseudo" / "train-00000.parquet").metadata[b"huggingface"])
    features = hf["info"]["features"]
    assert features["image"]["_type"] == features["mask"]["_type"] == "Image"
    assert features["labels"]["feature"]["names"] == meta["class_names"]
    truth = {r["image_id"]: r for r in rows_of(manifest)}
    p, boxed = RefineParams(), 0
    for row in rows_of(root / "pseudo"):
        mask = read_mask(row)
        assert mask.shape == (row["height"], row["width"])
        assert row["boxes"] == mask_boxes(mask, len(meta["class_names"]), min_pixels=p.boxes.min_pixels,
                                          connectivity=p.boxes.connectivity)
        boxed += len(row["boxes"])
        assert set(np.unique(mask).tolist()) <= {0, 255, *row["labels"]}
        assert row["image"] == truth[row["image_id"]]["image"]  # copied from the manifest
        assert sum(row["pixels"]) + round(row["ignore_fraction"] * mask.size) == mask.size
        assert len(row["pixels"]) == len(meta["class_names"]) and 0.0 <= row["confidence"] <= 1.0
    assert boxed > 0  # the shapes images have objects: boxes were found, not just compared empty


def test_empty_chain_is_the_ignore_middle_rule(inputs, tmp_path):
    root, manifest, _ = inputs
    refine.run(make_params(methods=()), root / "cams", manifest, tmp_path, progress=False)
    for cam_row, row in zip(rows_of(root / "cams"), rows_of(tmp_path)):
        if not cam_row["classes"]:  # tagged with no foreground class: all background
            assert row["boxes"] == []
            assert not read_mask(row).any()
            continue
        cam = F.interpolate(torch.from_numpy(decode_cams(cam_row))[None], size=(row["height"], row["width"]),
                            mode="bilinear", align_corners=False)[0]  # (P, H, W)
        value, slot = cam.max(dim=0)
        label = np.asarray(cam_row["classes"])[slot.numpy()]
        p = RefineParams()
        expected = np.where(value > p.thresholds.high, label, np.where(value > p.thresholds.low, 255, 0))
        np.testing.assert_array_equal(read_mask(row), expected)


@pytest.mark.parametrize("methods", [("par",), ("crf",), ("crf", "par")])
def test_other_chains_run(inputs, tmp_path, methods):
    root, manifest, _ = inputs
    result = refine.run(make_params(methods=methods, eval_splits=("val",)), root / "cams", manifest, tmp_path,
                        progress=False)
    assert result["images"] == 12 and result["metrics"]["images"] == 4
    for row in rows_of(tmp_path):
        assert set(np.unique(read_mask(row)).tolist()) <= {0, 255, *row["labels"]}


def test_par_first_matches_online_pseudo_labels_and_crf_first_matches_crf_two_thresholds():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    cams = rng.random((2, 12, 16), dtype=np.float32)
    full = F.interpolate(torch.from_numpy(cams)[None], size=(24, 32), mode="bilinear", align_corners=False)
    p = RefineParams(methods=("par",), thresholds=ThresholdConfig(high=0.7, low=0.25))
    (mask, _, _), = refine_chunk([rgb], [cams], [[2, 5]], p, torch.device("cpu"))
    labels = torch.zeros(1, 5)
    labels[0, [1, 4]] = 1  # classes 2 and 5 of K = 5
    cams_k = torch.zeros(1, 5, 24, 32)
    cams_k[0, [1, 4]] = full[0]
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    expected = online_pseudo_labels(cams_k, labels, images, ThresholdConfig(), ParConfig(),
                                    ignore_index=IGNORE_INDEX)[0]
    np.testing.assert_array_equal(mask, expected.numpy())
    p = RefineParams(methods=("crf",), thresholds=ThresholdConfig(high=0.7, low=0.25))
    (mask, _, _), = refine_chunk([rgb], [cams], [[2, 5]], p, torch.device("cpu"))
    expected = crf_two_thresholds(rgb, full[0].numpy(), [2, 5], CrfConfig())
    assert (mask == expected).mean() > 0.99  # numpy vs torch softmax: equal up to float rounding


def test_two_processes_write_identical_shards(inputs, tmp_path):
    root, manifest, _ = inputs
    result = refine.run(make_params(workers=2), root / "cams", manifest, tmp_path, progress=False)
    assert len(result["computed"]) == 3
    assert shard_hashes(tmp_path) == shard_hashes(root / "pseudo")


def test_fewer_shards_than_workers_split_into_pieces_that_write_identical_shards(inputs, tmp_path):
    root, manifest, _ = inputs  # 3 shards of 4 rows; 4 workers: each shard is refined as pieces on several workers
    whole = refine.run(make_params(batch_size=1), root / "cams", manifest, tmp_path / "whole", progress=False)
    pieces = refine.run(make_params(workers=4, batch_size=1), root / "cams", manifest, tmp_path / "pieces",
                        progress=False)
    assert shard_hashes(tmp_path / "pieces") == shard_hashes(tmp_path / "whole")
    assert pieces["metrics"] == whole["metrics"] and pieces["metrics"]["gt_images"] > 0


def test_split_tasks_cover_every_chunk_once():
    task = ShardTask("train-00000.parquet", "", "", "", "", RefineParams(batch_size=4), (), (), (), "cpu")
    assert split_tasks([task], {task.name: 9}, 1) == [task]  # one worker: whole shards
    assert split_tasks([task, task], {task.name: 9}, 2) == [task, task]  # as many shards as workers
    for rows, workers in ((9, 2), (24, 2), (3, 2), (256, 3)):
        pieces = split_tasks([task], {task.name: rows}, workers)
        chunks = [i for piece in pieces for i in range(*piece.chunks)]
        assert chunks == list(range(-(-rows // 4)))  # in order, each chunk of 4 rows exactly once
        assert len(pieces) == min(len(chunks), PIECES_PER_WORKER * workers)


def test_resume_and_invalidation(inputs, tmp_path, monkeypatch):
    root, manifest, _ = inputs
    reference = shard_hashes(root / "pseudo")
    out = tmp_path / "pseudo"
    shutil.copytree(root / "pseudo", out)
    (out / "val-00000.parquet").unlink()
    again = refine.run(make_params(), root / "cams", manifest, out, progress=False)
    assert again["computed"] == ["val-00000.parquet"] and shard_hashes(out) == reference
    assert again["metrics"] == inputs[2]["metrics"]  # metrics of reused shards come from the index

    killed, real_write = tmp_path / "killed", ShardSet.write

    def write_once_then_die(self, name, *args, **kw):
        if any(self.folder.glob("*.parquet")):
            raise KeyboardInterrupt("killed")
        return real_write(self, name, *args, **kw)

    monkeypatch.setattr(ShardSet, "write", write_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        refine.run(make_params(), root / "cams", manifest, killed, progress=False)
    monkeypatch.setattr(ShardSet, "write", real_write)
    resumed = refine.run(make_params(), root / "cams", manifest, killed, progress=False)
    assert len(resumed["computed"]) == 2 and shard_hashes(killed) == reference

    report_only = refine.run(make_params(eval_splits=("val",), overlays=2), root / "cams", manifest, out,
                             progress=False)
    assert report_only["computed"] == [] and report_only["metrics"]["images"] == 4
    crf_changed = refine.run(make_params(crf=CrfConfig(bilateral_srgb=5.0)), root / "cams", manifest, out, progress=False)
    assert len(crf_changed["computed"]) == 3


def test_metrics_and_overlays(inputs):
    root, _, result = inputs
    metrics = json.loads((root / "metrics.json").read_text())
    for key in ("miou", "coverage", "precision", "recall", "per_class", "mean_ignore_fraction"):
        assert key in metrics
    assert metrics == result["metrics"] and metrics["images"] == metrics["gt_images"] == 8  # train split
    assert 0.0 <= metrics["coverage"] <= 1.0 and 0.0 <= metrics["miou"] <= 100.0
    overlays = sorted((root / "overlays").glob("*.png"))
    assert len(overlays) == 8
    from PIL import Image
    with Image.open(overlays[0]) as image:
        assert image.width > 3 * image.height  # four panels side by side


@pytest.mark.parametrize("method, column", [("random_walk", "affinity"), ("fg_prior", "fg")])
def test_seed_methods_without_their_column_stop_before_any_work(inputs, tmp_path, method, column):
    root, manifest, _ = inputs
    with pytest.raises(ValueError, match=f"{method} needs the CAM column '{column}'.*use_"):
        refine.run(make_params(methods=(method, "par")), root / "cams", manifest, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.parquet"))  # nothing was written


def test_box_params_decide_the_boxes_and_the_shard_fingerprint(inputs, tmp_path):
    root, manifest, _ = inputs
    first = refine.run(make_params(methods=()), root / "cams", manifest, tmp_path, progress=False)
    default_boxes = [row["boxes"] for row in rows_of(tmp_path)]
    changed = refine.run(make_params(methods=(), boxes=BoxConfig(min_pixels=1, connectivity=4)), root / "cams", manifest,
                         tmp_path, progress=False)
    assert len(first["computed"]) == len(changed["computed"]) == 3  # box params are not report-only
    meta = read_metadata(tmp_path / "val-00000.parquet")
    assert meta["boxes"] == {"min_pixels": 1, "connectivity": 4}  # recorded: export cuts its COCO regions so
    rows, num_classes = rows_of(tmp_path), len(meta["class_names"])
    for row in rows:
        assert row["boxes"] == mask_boxes(read_mask(row), num_classes, min_pixels=1, connectivity=4)
    assert sum(map(len, (row["boxes"] for row in rows))) > sum(map(len, default_boxes))  # specks now count


def test_a_correction_replaces_its_mask_and_reruns_only_its_shard(inputs, tmp_path):
    from shards.corrections import Target, import_corrections
    from shards.manifest import read_classes

    root, manifest, _ = inputs
    out = tmp_path / "pseudo"
    shutil.copytree(root / "pseudo", out)
    classes = read_classes(manifest)
    rows = {r["image_id"]: r for r in rows_of(out)}
    chosen = pq.read_table(out / "train-00001.parquet").column("image_id").to_pylist()[0]
    height, width = rows[chosen]["height"], rows[chosen]["width"]
    fixed = np.zeros((height, width), np.uint8)
    fixed[: height // 2, : width // 2] = 1
    export = tmp_path / "export"
    export.mkdir()
    image = Image.fromarray(fixed, "P")
    image.putpalette([v for rgb in classes["palette"] for v in rgb])
    image.save(export / f"{chosen}.png")
    target = Target("dataset", tuple(classes["class_names"]), tuple(map(tuple, classes["palette"])),
                    {i: (r["width"], r["height"]) for i, r in rows.items()})
    assert import_corrections(export, tmp_path / "set", target)["imported"] == [chosen]

    result = refine.run(make_params(), root / "cams", manifest, out, progress=False, corrections_dir=tmp_path / "set")
    assert result["computed"] == ["train-00001.parquet"]  # the other shards are reused
    after = {r["image_id"]: r for r in rows_of(out)}
    assert after[chosen]["provenance"] == "corrected" and after[chosen]["confidence"] == 1.0
    assert np.array_equal(read_mask(after[chosen]), fixed) and after[chosen]["labels"] == [1]
    assert all(r["provenance"] == "pseudo" for i, r in after.items() if i != chosen)
    metrics = result["metrics"]
    assert metrics["corrected_images"] == 1 and metrics["uncorrected"]["gt_images"] == metrics["gt_images"] - 1
    again = refine.run(make_params(), root / "cams", manifest, out, progress=False, corrections_dir=tmp_path / "set")
    assert again["computed"] == []


def test_a_correction_of_an_image_not_in_the_data_stops_refine_before_any_work(inputs, tmp_path, capsys):
    import yaml

    from conftest import tiny_params
    from shards.corrections import Target, import_corrections
    from shards.manifest import read_classes

    root, manifest, _ = inputs
    classes = read_classes(manifest)
    export = tmp_path / "export"
    export.mkdir()
    image = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    image.save(export / "gone.png")
    target = Target("dataset", tuple(classes["class_names"]), tuple(map(tuple, classes["palette"])),
                    {"gone": (8, 8)})  # an image the set knew, no longer in the data
    import_corrections(export, tmp_path / "set", target)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    out = tmp_path / "pseudo"
    code = refine.main(["--params", str(tmp_path / "params.yaml"), "--cams", str(root / "cams"), "--manifest",
                        str(manifest), "--out", str(out), "--metrics", str(tmp_path / "m.json"), "--overlays",
                        str(tmp_path / "ov"), "--corrections", str(tmp_path / "set")])
    error = capsys.readouterr().err
    assert code == 2 and "corrections of 1 image(s) that are not in" in error and "gone" in error, error
    assert not out.exists() or not list(out.glob("*.parquet"))
