"""`python -m pipeline summary`: a line of headline figures per stage, read from the metrics files."""

import json

from pipeline.summary import summary_lines


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_each_stage_line_shows_its_own_figures_and_missing_stages_say_so(tmp_path):
    write(tmp_path / "metrics/prepare.json", {"images": {"train": 10, "val": 4}, "inputs": 15, "rejects": 1})
    write(tmp_path / "metrics/classifier.json", {"f1": 0.8766, "precision": 0.9, "recall": 0.85, "cam_miou": 41.23,
                                                 "cam_threshold": 0.75, "seconds_per_step": 1.5, "iterations": 40})
    write(tmp_path / "metrics/pseudo_labels.json", {"miou": 71.26, "coverage": 0.88, "precision": 80.0,
                                                    "recall": 90.0, "methods": ["par", "crf"], "gt_images": 10,
                                                    "corrected_images": 2,
                                                    "uncorrected": {"miou": 70.04, "coverage": 0.87, "gt_images": 8}})
    write(tmp_path / "metrics/segmenter.json", {"split": "val", "miou": 60.04, "miou_ms_flip": 62.5,
                                                "miou_ms_flip_crf": None, "images": 4})
    write(tmp_path / "metrics/cams.json", {"split": "train"})  # a file from another version: no crash
    lines = dict(line.split(None, 1) for line in summary_lines(tmp_path))
    assert lines["prepare"].startswith("10 train + 4 val images from 15 inputs, 1 rejected")
    assert "val F1 0.877" in lines["train_classifier"] and "CAM mIoU 41.2 at threshold 0.75" in lines["train_classifier"]
    assert lines["dump_cams"].startswith("metrics/cams.json: unexpected content (KeyError")
    assert "mIoU 71.3 at coverage 0.88" in lines["refine"] and "2 corrected by hand, the other 8: mIoU 70.0" in \
        lines["refine"]
    assert lines["export"] == "not run yet (data/export/package.json missing)"
    assert lines["evaluate"] == "val mIoU 60.0 single scale, 62.5 multi-scale + flip, - with the CRF too (4 images)"
    assert all(len(line) < 220 for line in summary_lines(tmp_path))  # readable, not hundreds of columns
