"""dump_cams on a tiny shapes manifest and a tiny random ToCo: shards, predicted tags, batching, resume, metrics."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from config.schema import DumpCamsParams, Params, PrepareConfig, RuntimeConfig, ShapesConfig
from models.toco import ToCo
from conftest import ROOT, kill_when_paused, tiny_params, tool_env
from labelling.cams import (
    CamShardTask,
    dump_cam_shard,
    load_worker_model,
    padded_size,
    shard_batches,
    split_pieces,
)
from shards.cams import decode_cams
from shards.fingerprint import classifier_fingerprint
from shards.io import ShardSet, read_metadata
from shards.manifest import manifest_files, read_classes
from stages import dump_cams, prepare, shapes
from tests.collection_inputs import TINY_CLASSIFIER
from training.checkpoint import save_weights
from training.classifier_model import config_to_json, toco_config

UNTAGGED = ("train-00001.parquet", (0, 2))  # rows whose tags are set to null
EMPTY = ("train-00001.parquet", 3)  # a row tagged with no foreground class (tags [])


def build_inputs(root: Path) -> tuple[Path, Path]:
    """A manifest (8 train + 4 val shapes images, 4 rows per shard, 2 untagged rows) and a tiny random ToCo."""
    shapes.run(ShapesConfig(num_train=8, num_val=4, min_side=64, max_side=96), root / "shapes", progress=False)
    manifest = root / "manifest"
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=4), manifest, progress=False)
    name, rows = UNTAGGED
    table = pq.read_table(manifest / name)
    records = table.to_pylist()
    for i in rows:
        records[i]["tags"], records[i]["tag_source"] = None, "none"
    records[EMPTY[1]]["tags"] = []
    entry = ShardSet(manifest).index()[name]
    ShardSet(manifest).write(name, pa.Table.from_pylist(records, schema=table.schema),
                             fingerprint=entry["fingerprint"], split="train")
    names = read_classes(manifest)["class_names"]
    cfg = toco_config(TINY_CLASSIFIER, len(names) - 1)
    torch.manual_seed(0)
    save_weights(ToCo(cfg), root / "classifier", config_to_json(cfg, names))
    return manifest, root / "classifier"


BASE = {"splits": ("train", "val"), "eval_split": "val", "image_size": 128, "cam_size": 64, "predict_size": 96}


def make_params(**kw) -> Params:
    return Params(runtime=RuntimeConfig(num_threads=1), dump_cams=DumpCamsParams(**{**BASE, **kw}))


def shard_hashes(folder: Path) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in ShardSet(folder).index().items()}


def all_rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    manifest, classifier = build_inputs(root)
    result = dump_cams.run(make_params(), manifest, classifier, root / "cams", root / "metrics" / "cams.json",
                           progress=False)
    return root, manifest, classifier, result


def test_one_fp16_shard_per_manifest_shard_with_present_classes(dumped):
    root, manifest, _, result = dumped
    names = sorted(p.name for s in ("train", "val") for p in manifest_files(manifest, s))
    assert sorted(result["computed"]) == names and result["images"] == 12
    assert sorted(p.name for p in (root / "cams").glob("*.parquet")) == names
    meta = read_metadata(root / "cams" / names[0])
    assert meta["kind"] == "cams" and meta["class_names"][0] == "background"
    assert set(meta["producer"]) == {"stage", "code_version", "params_fingerprint", "model_fingerprint"}
    assert meta["producer"]["model_fingerprint"] == classifier_fingerprint(root / "classifier")  # relabel's too
    for name in names:
        truth = pq.read_table(manifest / name).to_pylist()
        cams = pq.read_table(root / "cams" / name).to_pylist()
        assert [r["image_id"] for r in cams] == [r["image_id"] for r in truth]  # manifest order kept
        for row, gt in zip(cams, truth):
            cam = decode_cams(row)
            assert len(row["cams"]) == cam.size * 2  # fp16 bytes, present classes only
            assert cam.shape == (len(row["classes"]), row["cam_height"], row["cam_width"])
            assert max(row["cam_height"], row["cam_width"]) == BASE["cam_size"] and row["aux_cams"] is None
            assert (row["height"], row["width"]) == (gt["height"], gt["width"])
            assert ((0.0 <= cam) & (cam <= 1.0)).all() and len(row["scores"]) == len(row["classes"])
            if gt["tags"] is not None:
                assert row["classes"] == sorted(gt["tags"]) and row["tag_source"] == "given"
                assert all(plane.max() > 0.8 for plane in cam)  # min-max normalised, then reduced


def test_untagged_rows_get_predicted_classes_and_empty_tags_no_cams(dumped):
    root, _, _, _ = dumped
    name, untagged = UNTAGGED
    rows = pq.read_table(root / "cams" / name).to_pylist()
    for i, row in enumerate(rows):
        assert row["tag_source"] == ("predicted" if i in untagged else "given")
    assert rows[EMPTY[1]]["classes"] == [] and decode_cams(rows[EMPTY[1]]).shape[0] == 0
    for i in untagged:
        scores = np.array(rows[i]["scores"])
        assert len(rows[i]["classes"]) >= 1
        assert len(scores) == 1 or np.all(scores > 0.5)  # above the threshold, or the top-1 fallback


def test_batches_of_mixed_sizes_equal_batch_size_one(dumped, tmp_path):
    root, manifest, classifier, _ = dumped
    # pad_multiple 128: every image pads to 128x128, so each batch mixes images of different real sizes
    mixed = dump_cams.run(make_params(pad_multiple=128, batch_size=8), manifest, classifier, tmp_path / "a",
                          progress=False)
    single = dump_cams.run(make_params(pad_multiple=128, batch_size=1), manifest, classifier, tmp_path / "b",
                           progress=False)
    assert mixed["images"] == single["images"] == 12
    rows_a, rows_b = all_rows(tmp_path / "a"), all_rows(tmp_path / "b")
    assert len({(r["height"], r["width"]) for r in rows_a}) > 1
    for a, b in zip(rows_a, rows_b):
        assert a["classes"] == b["classes"]
        torch.testing.assert_close(torch.from_numpy(decode_cams(a)), torch.from_numpy(decode_cams(b)),
                                   atol=2e-3, rtol=0)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def test_batches_group_one_padded_shape_in_near_equal_sizes():
    p = DumpCamsParams(image_size=128, pad_multiple=32, batch_size=16)
    rows = [{"height": 96, "width": 128}] * 24 + [{"height": 128, "width": 96}] * 5
    batches = shard_batches(rows, p)
    assert [len(b) for b in batches] == [12, 12, 5]  # 24 at 16 a batch: 12 + 12, not 16 + 8
    assert sorted(i for b in batches for i in b) == list(range(29))
    assert all(len({padded_size(rows[i]["height"], rows[i]["width"], p) for i in b}) == 1 for b in batches)


def test_pieces_of_whole_batches_give_the_rows_of_the_whole_shard(dumped):
    _, manifest, classifier, _ = dumped
    p = make_params(batch_size=2).dump_cams
    tasks = [CamShardTask(str(path), p, "cpu") for path in manifest_files(manifest, "train")]
    pieces = split_pieces(tasks, workers=4)  # 2 shards for 4 workers: each shard in pieces
    assert len(pieces) > len(tasks) and all(piece.batches is not None for piece in pieces)
    load_worker_model(str(classifier), "test", "cpu")
    whole = {task.path: dump_cam_shard(task) for task in tasks}
    for task in tasks:
        rows = {}
        for piece in (piece for piece in pieces if piece.path == task.path):
            part = dump_cam_shard(piece)
            assert not set(part) & set(rows)  # no row twice
            rows.update(part)
        assert rows == whole[task.path]  # every row, equal to the whole shard's


@pytest.mark.slow
def test_dump_workers_split_shards_into_pieces_of_whole_batches(dumped, tmp_path):
    root, manifest, classifier, _ = dumped
    # 3 shards for 4 worker processes: every shard is dumped as pieces (batches of 2) on several workers
    pooled = dump_cams.run(make_params(batch_size=2, workers=4), manifest, classifier, tmp_path / "pool",
                           progress=False)
    alone = dump_cams.run(make_params(batch_size=2), manifest, classifier, tmp_path / "alone", progress=False)
    assert pooled["images"] == alone["images"] == 12 and sorted(pooled["computed"]) == sorted(alone["computed"])
    for a, b in zip(all_rows(tmp_path / "pool"), all_rows(tmp_path / "alone"), strict=True):
        assert (a["image_id"], a["classes"], a["tag_source"]) == (b["image_id"], b["classes"], b["tag_source"])
        torch.testing.assert_close(torch.from_numpy(decode_cams(a)), torch.from_numpy(decode_cams(b)),
                                   atol=2e-3, rtol=0)
    # workers is a speed setting: the shards of one are the shards of the other, not recomputed
    again = dump_cams.run(make_params(batch_size=2, workers=1), manifest, classifier, tmp_path / "pool",
                          progress=False)
    assert again["computed"] == [] and len(again["skipped"]) == 3


def test_resume_recomputes_only_missing_shards_and_matches(dumped, tmp_path, monkeypatch):
    root, manifest, classifier, _ = dumped
    reference = shard_hashes(root / "cams")
    out = tmp_path / "cams"
    shutil.copytree(root / "cams", out)
    (out / "train-00001.parquet").unlink()
    again = dump_cams.run(make_params(), manifest, classifier, out, progress=False)
    assert again["computed"] == ["train-00001.parquet"] and len(again["skipped"]) == 2
    assert shard_hashes(out) == reference

    # a run killed after its first shard: the rerun does the rest only, and ends identical
    killed = tmp_path / "killed"
    real_write = ShardSet.write

    def write_once_then_die(self, name, *args, **kw):
        if any(self.folder.glob("*.parquet")):
            raise KeyboardInterrupt("killed")
        return real_write(self, name, *args, **kw)

    monkeypatch.setattr(ShardSet, "write", write_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        dump_cams.run(make_params(), manifest, classifier, killed, progress=False)
    monkeypatch.setattr(ShardSet, "write", real_write)
    assert len(list(killed.glob("*.parquet"))) == 1
    resumed = dump_cams.run(make_params(), manifest, classifier, killed, progress=False)
    assert len(resumed["skipped"]) == 1 and len(resumed["computed"]) == 2
    assert shard_hashes(killed) == reference
    for path in (root / "cams").glob("*.parquet"):
        assert (killed / path.name).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_sigkill_after_the_first_shard_then_rerun_computes_the_rest_only(dumped, tmp_path):
    root, manifest, classifier, _ = dumped
    raw = tiny_params()
    raw["runtime"]["num_threads"] = 1
    raw["dump_cams"].update({k: list(v) if isinstance(v, tuple) else v for k, v in BASE.items()})  # make_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stages.dump_cams", "--params", str(tmp_path / "params.yaml"), "--manifest",
           str(manifest), "--classifier", str(classifier), "--out", str(killed), "--metrics", str(tmp_path / "m.json")]
    kill_when_paused(cmd, "shard:1", cwd=ROOT, log=tmp_path / "killed.log")
    assert len(ShardSet(killed).index()) == len(list(killed.glob("*.parquet"))) == 1  # written and recorded
    assert not (tmp_path / "m.json").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "in 2 shards computed (1 shards reused)" in resumed.stderr, resumed.stderr[-3000:]
    assert shard_hashes(killed) == shard_hashes(root / "cams")  # identical to the uninterrupted run
    assert not list(killed.glob(".*.tmp"))


def test_changed_param_invalidates_all_and_prune_drops_splits(dumped, tmp_path):
    root, manifest, classifier, _ = dumped
    out = tmp_path / "cams"
    shutil.copytree(root / "cams", out)
    # a metrics-only key does not touch the shards
    same = dump_cams.run(make_params(bkg_threshold=0.4), manifest, classifier, out, progress=False)
    assert same["computed"] == []
    changed = dump_cams.run(make_params(scales=(1.0,), splits=("train",), eval_split="train"), manifest, classifier, out,
                            progress=False)
    assert sorted(changed["computed"]) == ["train-00000.parquet", "train-00001.parquet"]
    assert changed["removed"] == ["val-00000.parquet"] and not (out / "val-00000.parquet").exists()
    assert set(ShardSet(out).index()) == {"train-00000.parquet", "train-00001.parquet"}


def test_metrics_and_curve(dumped):
    root, _, _, result = dumped
    metrics = json.loads((root / "metrics" / "cams.json").read_text())
    for key in ("miou", "threshold", "best_miou", "best_threshold", "per_class"):
        assert key in metrics
    assert metrics["images"] == 4 and metrics["threshold"] == 0.5 and 0 <= metrics["miou"] <= 100
    curve = json.loads((root / "metrics" / "cams_curve.json").read_text())["curve"]
    assert [round(p["threshold"], 2) for p in curve] == [round(0.05 * i, 2) for i in range(1, 20)]
    assert metrics["best_miou"] == max(p["miou"] for p in curve) >= metrics["miou"]
    assert metrics["miou"] == next(p["miou"] for p in curve if p["threshold"] == 0.5)


def test_aux_head_cams_are_stored_when_asked(dumped, tmp_path):
    _, manifest, classifier, _ = dumped
    dump_cams.run(make_params(aux=True, splits=("val",), scales=(1.0,)), manifest, classifier, tmp_path,
                  progress=False)
    for row in all_rows(tmp_path):
        assert decode_cams(row, "aux_cams").shape == decode_cams(row).shape


def test_tag_scores_at_image_size_reuse_the_first_cam_pass_without_changing_cams(dumped, tmp_path):
    """predict_size == image_size shares scale 1's encoder pass; the CAMs must not depend on that shortcut."""
    _, manifest, classifier, _ = dumped
    shared = dump_cams.run(make_params(predict_size=0), manifest, classifier, tmp_path / "a", progress=False)
    separate = dump_cams.run(make_params(predict_size=128, scales=(0.5, 1.0)), manifest, classifier, tmp_path / "b",
                             progress=False)
    assert shared["images"] == separate["images"] == 12
    for a, b in zip(all_rows(tmp_path / "a"), all_rows(tmp_path / "b")):
        assert a["classes"] == b["classes"] and a["tag_source"] == b["tag_source"]
        torch.testing.assert_close(torch.from_numpy(decode_cams(a)), torch.from_numpy(decode_cams(b)),
                                   atol=2e-3, rtol=0)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def test_without_the_flip_the_reuse_shortcut_holds_and_the_cams_are_the_images_own(dumped, tmp_path):
    """flip: false runs each scale once; the scale-1 pass that gave the scores still doubles as the CAMs' first."""
    root, manifest, classifier, _ = dumped
    shared = dump_cams.run(make_params(predict_size=0, flip=False), manifest, classifier, tmp_path / "a",
                           progress=False)
    separate = dump_cams.run(make_params(predict_size=128, scales=(0.5, 1.0), flip=False), manifest, classifier,
                             tmp_path / "b", progress=False)
    flipped = all_rows(root / "cams")  # the module's dump: flip on
    assert shared["images"] == separate["images"] == 12
    differs = 0
    for a, b, c in zip(all_rows(tmp_path / "a"), all_rows(tmp_path / "b"), flipped):
        assert a["image_id"] == c["image_id"] and a["classes"] == b["classes"]
        cam_a = decode_cams(a)
        torch.testing.assert_close(torch.from_numpy(cam_a), torch.from_numpy(decode_cams(b)), atol=2e-3, rtol=0)
        assert cam_a.size == 0 or (cam_a.min() >= 0 and cam_a.max() <= 1)
        if a["classes"] == c["classes"] and len(a["classes"]):
            differs += int(np.abs(cam_a.astype(np.float32) - decode_cams(c).astype(np.float32)).max() > 1e-2)
    assert differs > 0  # the mirrored pass is really gone


def test_eval_split_outside_splits_is_refused():
    with pytest.raises(ValueError, match="eval_split"):
        DumpCamsParams(splits=("train",), eval_split="val").validate()
