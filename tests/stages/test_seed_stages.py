"""The AFA / APC / TRT options through the stages: train_classifier -> dump_cams -> refine (tiny preset)."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import merge, tiny_params

from models.affinity import propagate
from shards.cams import decode_affinity, decode_cams, decode_fg
from shards.images import long_side_size
from config.loader import build
from config.schema import Params, PrepareConfig
from labelling import cams as cam_dump
from refinement.chain import refine_chunk
from stages import dump_cams, prepare, refine, shapes, train_classifier

OPTIONS = {"model": {"pooling": "akp", "use_afa": True, "afa_layers": 2, "use_trt": True},
           "loss": {"use_pcl": True, "seg_start_iter": 1}, "optim": {"iterations": 3}, "loop": {"eval_every": 100}}


def params_with(overrides: dict | None = None, refine_overrides: dict | None = None) -> Params:
    raw = tiny_params()
    merge(raw["train_classifier"], merge(copy.deepcopy(OPTIONS), overrides or {}))
    raw["dump_cams"].update({"splits": ["train", "val"], "eval_split": "val", "image_size": 64,
                             "predict_size": 64})
    merge(raw["refine"], refine_overrides or {})
    raw["runtime"].update({"num_threads": 1, "num_workers": 1})
    return build(Params, raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    params = params_with()
    shapes.run(params.shapes, root / "shapes", progress=False)
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=16), root / "manifest", progress=False)
    result = train_classifier.run(params, root / "manifest", root / "classifier", root / "ckpt",
                                  root / "classifier.json", progress=False)
    dumped = dump_cams.run(params, root / "manifest", root / "classifier", root / "cams", root / "cams.json",
                           progress=False)
    return root, params, result, dumped


def rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_option_trains_and_reports_its_losses_and_step_time(trained):
    root, _, result, _ = trained
    assert result["seconds_per_step"] > 0
    log = (root / "classifier" / "config.json").read_text()
    for key in ('"pooling": "akp"', '"use_afa": true', '"use_trt": true'):
        assert key in log


def test_dump_stores_fg_and_affinity_of_the_image_tokens(trained):
    root, params, _, dumped = trained
    assert dumped["images"] > 0
    stride = 8  # tiny preset: patch 8, no stem
    for row in rows(root / "cams"):
        fg = decode_fg(row)
        assert fg.shape == (row["cam_height"], row["cam_width"]) and 0 <= fg.min() and fg.max() <= 1
        affinity, grid = decode_affinity(row)
        h, w = long_side_size(row["height"], row["width"], params.dump_cams.image_size)
        assert grid == (-(-h // stride), -(-w // stride))  # the tokens covering the image, not its padding
        assert affinity.shape == (grid[0] * grid[1],) * 2
        assert np.allclose(affinity, affinity.T, atol=1 / 255)  # AFA's head is symmetric
        assert decode_cams(row).shape[0] == len(row["classes"])


def test_affinity_is_the_same_whether_tags_come_from_the_scale_1_pass_or_their_own(trained, tmp_path):
    """predict_size != image_size: tags from their own pass, the affinity from the multi-scale CAM's scale 1."""
    root, params, _, _ = trained
    other = dataclasses.replace(params, dump_cams=dataclasses.replace(params.dump_cams, predict_size=48))
    dump_cams.run(other, root / "manifest", root / "classifier", tmp_path, progress=False)
    for a, b in zip(rows(root / "cams"), rows(tmp_path)):
        assert decode_affinity(a)[1] == decode_affinity(b)[1]
        assert np.abs(decode_affinity(a)[0] - decode_affinity(b)[0]).max() <= 1 / 255 + 1e-6
        assert np.abs(decode_fg(a) - decode_fg(b)).max() < 2e-3


def test_default_classifier_dumps_no_seed_columns(tmp_path):
    from tests.stages.test_dump_cams import build_inputs, make_params

    manifest, classifier = build_inputs(tmp_path)
    dump_cams.run(make_params(), manifest, classifier, tmp_path / "cams", progress=False)
    row = rows(tmp_path / "cams")[0]
    assert row["fg"] is None and row["affinity"] is None and row["aff_height"] is None


@pytest.mark.parametrize("methods", [("fg_prior", "random_walk", "par", "crf"), ("par", "random_walk"),
                                     ("random_walk",)])
def test_refine_runs_the_seed_methods(trained, tmp_path, methods):
    root, _, _, _ = trained
    params = params_with(refine_overrides={"methods": list(methods), "eval_splits": ["val"]})
    result = refine.run(params, root / "cams", root / "manifest", tmp_path, progress=False)
    assert result["images"] > 0 and 0 <= result["metrics"]["miou"] <= 100
    assert pq.read_metadata(next(tmp_path.glob("*.parquet")))  # shards written


def test_random_walk_first_walks_raw_values_before_the_softmax(trained):
    """[random_walk] alone = AFA's rule: arg-max of the walked [background plane, CAMs] at the high plane."""
    root, params, _, _ = trained
    row = next(r for r in rows(root / "cams") if len(r["classes"]) == 1)
    cams, (affinity, grid) = decode_cams(row), decode_affinity(row)
    h, w = 40, 52
    p = params_with(refine_overrides={"methods": ["random_walk"], "ignore_band": False,
                                      "thresholds": {"bkg": 0.5}}).refine
    rgb = np.zeros((h, w, 3), np.uint8)
    (mask, _, _), = refine_chunk([rgb], [cams], [row["classes"]], p, torch.device("cpu"),
                              [{"affinity": (affinity, grid), "fg": None}])
    cam = torch.nn.functional.interpolate(torch.from_numpy(cams)[None], size=(h, w), mode="bilinear",
                                          align_corners=False)[0]
    stack = torch.cat([torch.full((1, h, w), 0.5), cam])
    walked = propagate(stack, torch.from_numpy(affinity), grid)
    expected = np.where(walked.argmax(0).numpy() == 1, row["classes"][0], 0)
    assert (mask == expected).mean() > 0.999  # equal up to float ties


def test_fg_prior_keeps_cams_under_a_full_prior_and_erases_them_where_it_is_zero(trained):
    root, params, _, _ = trained
    row = next(r for r in rows(root / "cams") if r["classes"])
    cams = decode_cams(row)
    p_plain = params_with(refine_overrides={"methods": []}).refine
    p_prior = params_with(refine_overrides={"methods": ["fg_prior"]}).refine
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    ones = np.ones(cams.shape[1:], np.float32)
    plain = refine_chunk([rgb], [cams], [row["classes"]], p_plain, torch.device("cpu"))[0][0]
    prior = refine_chunk([rgb], [cams], [row["classes"]], p_prior, torch.device("cpu"), [{"fg": ones}])[0][0]
    assert np.array_equal(prior, plain)  # a prior of ones changes nothing
    left_off = ones.copy()
    left_off[:, : ones.shape[1] // 2] = 0.0
    half = refine_chunk([rgb], [cams], [row["classes"]], p_prior, torch.device("cpu"), [{"fg": left_off}])[0][0]
    assert (half[:, :18] == 0).all()  # background wherever the prior is 0 (the bilinear seam aside)
    assert np.array_equal(half[:, 22:] != 0, plain[:, 22:] != 0) or (half[:, 22:] != 0).sum() >= \
        (plain[:, 22:] != 0).sum()  # the other half keeps (or, renormalised, grows) its foreground


def test_akp_scores_in_dump_follow_the_model_pooling(trained):
    """dump_cams' tag scores use the classifier's own pooling (APC's adaptive K here), over valid tokens."""
    root, params, _, _ = trained
    from training.classifier_model import load_classifier

    model, _ = load_classifier(root / "classifier")
    images = torch.rand(1, 3, 64, 48)
    valid = torch.ones(1, 64, 48, dtype=torch.bool)
    with torch.no_grad():
        scores, _, _ = cam_dump.class_scores(model, images, valid)
        logits = model(images, with_seg=False)["logits"]
    assert torch.allclose(scores, logits.sigmoid(), atol=1e-5)
