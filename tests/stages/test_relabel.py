"""relabel on a tiny collection (untagged images, two tagged in tags.csv, one broken file) and a tiny random ToCo."""

import dataclasses
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pydensecrf.densecrf")

from config.loader import build  # noqa: E402
from config.schema import Params  # noqa: E402
from shards.collections import read_current  # noqa: E402
from shards.fingerprint import hash_inputs  # noqa: E402
from shards.pseudo_labels import read_mask  # noqa: E402
from stages import relabel  # noqa: E402
from tests.collection_inputs import TINY_RELABEL, make_classifier, make_collection  # noqa: E402


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("relabel")
    ids = make_collection(root / "inbox" / "holiday", 6)
    (root / "inbox" / "holiday" / "tags.csv").write_text(f"image,tags\n{ids[0]},disc\n{ids[1]},square star\n")
    classifier = make_classifier(root / "classifier")
    params = build(Params, TINY_RELABEL)
    summary = relabel.run(params, "holiday", root / "inbox" / "holiday", classifier, root / "out" / "holiday",
                          progress=False)
    return root, params, ids, summary


def test_predicted_tags_are_recorded_and_the_broken_image_is_rejected(relabelled):
    root, _, ids, summary = relabelled
    version = root / "out" / "holiday" / summary["version"]
    assert summary["inputs"] == 7 and summary["images"] == 6 and summary["rejects"] == 1
    assert summary["reject_rows"][0]["image_id"] == "broken" and summary["reject_rows"][0]["reason"]
    assert summary["predicted"] + summary["no_known_class"] == 4 and summary["given"] == 2
    rows = {r["image_id"]: r for path in sorted((version / "pseudo_labels").glob("*.parquet"))
            for r in pq.read_table(path).to_pylist()}
    assert sorted(rows) == sorted(ids)
    per_image = {r["image_id"]: r for r in summary["per_image"]}
    assert rows[ids[0]]["tag_source"] == "given" and per_image[ids[0]]["tags"] == ["disc"]
    assert rows[ids[1]]["tag_source"] == "given" and per_image[ids[1]]["tags"] == ["square", "star"]
    threshold = relabelled[1].dump_cams.predict_threshold
    for image_id in ids[2:]:  # no class is forced: every predicted tag cleared the threshold, or there is none
        row, entry = rows[image_id], per_image[image_id]
        assert row["tag_source"] in ("predicted", "unknown")
        assert (row["tag_source"] == "predicted") == bool(entry["tags"])
        assert all(s > threshold for s in entry["scores"]) and len(entry["best_scores"]) == 3
    for image_id, row in rows.items():  # labels are exactly the classes the mask holds, within the tags
        held = sorted(int(v) for v in np.unique(read_mask(row)) if 0 < v < 255)
        assert row["labels"] == held and set(per_image[image_id]["labels"]) <= set(per_image[image_id]["tags"])
    assert all(s is not None and 0.0 <= s <= 1.0 for r in per_image.values() for s in r["scores"])
    tags_csv = (version / "tags.csv").read_text().splitlines()
    assert tags_csv[0] == "image,tags,tag_source,scores" and len(tags_csv) == 7 - summary["no_known_class"]
    assert [c["class"] for c in summary["per_class"]][:2] == ["background", "disc"]
    assert sum(c["images"] for c in summary["per_class"][1:]) == sum(len(r["labels"]) for r in rows.values())
    assert len(list((version / "overlays").glob("*.png"))) == 2
    page = (version / "review.html").read_text()
    worst = [r["image_id"] for r in sorted(rows.values(), key=lambda r: (r["label_score"], r["image_id"]))]
    assert re.findall(r'<tr data-id="([^"]+)"', page) == worst  # all 6 images, lowest label score first
    assert [r["image_id"] for r in summary["per_image"]] == worst  # the summary lists them in that order too
    assert all(r["label_score"] == pytest.approx(r["confidence"] * (1 - r["ignore_fraction"]), abs=1e-4)
               for r in rows.values())
    assert "<th>CAM</th>" in page and page.count('<img class="cam"') == 6 and "orchestration.review_rows" in page
    assert summary["review"] == {"file": "review.html", "rows": 6, "bytes": len(page.encode())}
    current = read_current(root / "out", "holiday")
    assert current["version"] == summary["version"] and current["summary"]["images"] == 6
    assert summary["version"] == f"{summary['classifier'][:12]}-{summary['params_fingerprint'][:12]}"


def test_rerun_reuses_every_shard_and_new_params_make_a_new_version(relabelled):
    root, params, _, summary = relabelled
    out = root / "out" / "holiday"
    before = hash_inputs([out / summary["version"] / "pseudo_labels"])
    again = relabel.run(params, "holiday", root / "inbox" / "holiday", root / "classifier", out, progress=False)
    assert again["version"] == summary["version"] and again["computed_shards"] == {"dump_cams": 0, "refine": 0}
    # speed-only and report-only params do not make a new version
    faster = dataclasses.replace(params, runtime=dataclasses.replace(params.runtime, num_workers=2),
                                 refine=dataclasses.replace(params.refine, overlays=1),
                                 orchestration=dataclasses.replace(params.orchestration, review_rows=2))
    assert relabel.labelling_fingerprint(faster) == relabel.labelling_fingerprint(params)
    capped = relabel.run(faster, "holiday", root / "inbox" / "holiday", root / "classifier", out, progress=False)
    assert capped["version"] == summary["version"] and capped["review"]["rows"] == 2  # the page of the same version
    page = (out / summary["version"] / "review.html").read_text()
    assert len(re.findall(r'<tr data-id="', page)) == 2 and "2 of 6 images" in page

    changed = dataclasses.replace(params, refine=dataclasses.replace(
        params.refine, crf=dataclasses.replace(params.refine.crf, bilateral_srgb=5.0)))
    other = relabel.run(changed, "holiday", root / "inbox" / "holiday", root / "classifier", out, progress=False)
    assert other["version"] != summary["version"] and other["classifier"] == summary["classifier"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([summary["version"], other["version"]])
    assert hash_inputs([out / summary["version"] / "pseudo_labels"]) == before  # the old version is untouched
    assert json.loads((out / "current.json").read_text())["version"] == other["version"]


def test_a_bad_collection_name_is_refused(relabelled, tmp_path):
    root, params, _, _ = relabelled
    with pytest.raises(ValueError, match="collection name"):
        relabel.run(params, "Bad Name", root / "inbox" / "holiday", root / "classifier", tmp_path, progress=False)


def test_an_edited_ground_truth_mask_is_taken_on_the_next_run(tmp_path):
    """Issue 14, row 12: the manifest fingerprint covered image stats and tags only, so a relabelled collection
    kept reporting the mIoU of its old masks."""
    import numpy as np
    from PIL import Image

    inbox = tmp_path / "inbox" / "walk"
    ids = make_collection(inbox, 4, broken=False, masks=True)
    classifier = make_classifier(tmp_path / "classifier")
    params = build(Params, TINY_RELABEL)
    first = relabel.run(params, "walk", inbox, classifier, tmp_path / "out", progress=False)
    assert first["metrics"]["gt_images"] == 4
    edited = inbox / "masks" / f"{ids[0]}.png"
    mask = Image.open(edited)
    values = np.asarray(mask).copy()
    values[values != 255] = 0  # the objects of one image become background
    blank = Image.fromarray(values, "P")
    blank.putpalette(mask.getpalette())
    blank.save(edited)
    again = relabel.run(params, "walk", inbox, classifier, tmp_path / "out", progress=False)
    fresh = relabel.run(params, "walk", inbox, classifier, tmp_path / "fresh", progress=False)
    assert again["version"] == first["version"]
    assert again["metrics"]["miou"] == fresh["metrics"]["miou"] != first["metrics"]["miou"]


@pytest.mark.parametrize("fate", ["ignore", "exclude"])
def test_images_with_no_known_class_get_no_forced_tag(tmp_path, fate):
    """No class can clear a threshold of 1: every untagged image has no known class. ``ignore`` keeps it with an
    all-255 mask and no labels; ``exclude`` leaves it out of the pseudo labels; both list it with its best scores."""
    from shards.gallery import gallery_markdown

    inbox = tmp_path / "inbox" / "odd"
    ids = make_collection(inbox, 3, broken=False)
    (inbox / "tags.csv").write_text(f"image,tags\n{ids[0]},disc\n")
    params = build(Params, {**TINY_RELABEL, "dump_cams": {**TINY_RELABEL["dump_cams"], "predict_threshold": 1.0},
                            "refine": {**TINY_RELABEL["refine"], "no_known_class": fate}})
    summary = relabel.run(params, "odd", inbox, make_classifier(tmp_path / "classifier"), tmp_path / "out",
                          progress=False)
    version = tmp_path / "out" / summary["version"]
    rows = {r["image_id"]: r for path in sorted((version / "pseudo_labels").glob("*.parquet"))
            for r in pq.read_table(path).to_pylist()}
    assert summary["no_known_class"] == 2 and summary["predicted"] == 0 and summary["given"] == 1
    assert [r["image_id"] for r in summary["no_known_class_rows"]] == sorted(ids[1:])
    assert all(len(r["best_scores"]) == 3 and r["row"] == ("all ignore" if fate == "ignore" else "excluded")
               for r in summary["no_known_class_rows"])
    assert any("no known class" in w and f"refine.no_known_class" in w for w in summary["warnings"])
    assert any("No OOD scores" in w for w in summary["warnings"])  # a classifier without feature statistics
    if fate == "ignore":
        assert sorted(rows) == sorted(ids) and summary["images"] == 3
        for image_id in ids[1:]:
            row = rows[image_id]
            assert row["tag_source"] == "unknown" and row["labels"] == [] and row["ignore_fraction"] == 1.0
            assert (read_mask(row) == 255).all() and row["label_score"] == 0.0 and row["object_confidence"] is None
    else:
        assert sorted(rows) == [ids[0]] and summary["images"] == 1
    assert (version / "tags.csv").read_text().count("\n") == 2  # the header and the given row: no empty tags
    gallery = gallery_markdown(version, 8, "odd")
    assert gallery.count("data:image/jpeg;base64,") == 2 * summary["images"]  # image and CAM of every row
    assert "| ![background](data:image/png;base64," in gallery and "ignore (255" in gallery
    assert ("no known class; best: " in gallery) == (fate == "ignore")
