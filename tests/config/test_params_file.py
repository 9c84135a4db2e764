"""The shipped params.yaml and presets: they load strictly, name every key of the schema, their key comments are the
schema's help texts, and every bad key stops a stage before any work with exit 2, naming the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.document import annotate, missing_keys, settable_keys
from config.loader import ParamsError
from config.schema import PRESETS_DIR, Params, load_params
from stages import prepare

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
FILES = [PARAMS, *sorted(PRESETS_DIR.glob("*.yaml"))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_params_files_name_every_key_with_the_schemas_help(path):
    load_params(path)
    text = path.read_text()
    assert missing_keys(text, Params) == []
    assert annotate(text, Params) == text, f"{path.name}: run `python -m pipeline params`"


def test_settable_keys_reach_into_nested_sections_and_leave_out_derived_ones():
    keys = settable_keys(Params)
    assert {"train_classifier.model.depth", "train_classifier.loss.par.iterations", "refine.crf.bilateral_sxy",
            "evaluate.crf.bilateral_sxy", "train_segmenter.optim.lr"} <= set(keys)
    assert "train_classifier.model.num_classes" not in keys and "train_segmenter.model.num_classes" not in keys


def test_the_cpu_preset_is_the_shipped_params():
    assert load_params(PRESETS_DIR / "cpu.yaml") == load_params(PARAMS)


def test_one_config_type_serves_every_crf_and_par():
    params = load_params(PARAMS)
    assert type(params.refine.crf) is type(params.evaluate.crf)
    assert type(params.refine.par) is type(params.train_classifier.loss.par)
    assert type(params.refine.thresholds) is type(params.train_classifier.loss.thresholds)
    # the evaluation kernels of METHODS.md §2 differ from the pseudo-label ones
    assert params.evaluate.crf.bilateral_sxy == 121.0 and params.refine.crf.bilateral_sxy == 36.0


def test_the_model_is_built_from_its_section_whole():
    params = load_params(PARAMS).train_classifier
    toco = params.toco(num_classes=7)
    assert toco.num_classes == 7 and toco.img_size == params.augment.crop_size
    assert {k: v for k, v in vars(toco).items() if k not in ("num_classes", "img_size")} == \
        {k: v for k, v in vars(params.model).items() if k not in ("num_classes", "img_size")}


def edited(tmp_path, dotted: str, value) -> Path:
    data = yaml.safe_load(PARAMS.read_text())
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("dotted, value, needle", [
    ("prepare.sourse", "voc", "prepare.sourse: unknown key"),
    ("prepare.rows_per_shard", 0, "prepare.rows_per_shard: 0 is below the minimum 1"),
    ("shapes.num_train", "many", "shapes.num_train: expected an integer"),
    ("prepare.source", "imagenet", "prepare.source: 'imagenet' is not one of"),
    ("train_classifier.model.depht", 4, "train_classifier.model.depht: unknown key"),
    ("train_classifier.loss.par.iterations", 0, "train_classifier.loss.par.iterations: 0 is below the minimum 1"),
    ("train_classifier.model.num_classes", 3, "train_classifier.model.num_classes: set by the stage"),
    ("refine.crf.gauss_sxy", "wide", "refine.crf.gauss_sxy: expected a number"),
    ("refine.thresholds.low", 0.9, "refine.thresholds: low 0.9 must not exceed high"),
    ("train_segmenter.optim.optimizer", "adam", "train_segmenter.optim.optimizer: 'adam' is not one of"),
    ("train_classifier.loss.local_crop_size", 4096, "local_crop_size 4096 does not fit"),
])
def test_bad_key_names_file_and_key(tmp_path, dotted, value, needle):
    path = edited(tmp_path, dotted, value)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_a_key_given_twice_stops_the_stage_before_any_work(tmp_path, capsys):
    text = PARAMS.read_text().replace("  min_side: 16 ", "  min_side: 100000\n  min_side: 16 ", 1)
    assert text != PARAMS.read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text)
    out = tmp_path / "manifest"
    assert prepare.main(["--params", str(path), "--out", str(out), "--metrics", str(tmp_path / "m.json")]) == 2
    message = capsys.readouterr().err
    assert "prepare.min_side: key given twice" in message and str(path) in message
    assert not out.exists()


def test_a_nested_duplicate_is_named_by_its_dotted_path(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("\n      w1: 0.3 ", "\n      w1: 0.5\n      w1: 0.3 ", 1))
    with pytest.raises(ParamsError, match=r"train_classifier\.loss\.par\.w1: key given twice \(line \d+\)"):
        load_params(path)


def test_params_check_command_finds_a_stale_comment(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("# dvclive logging interval in steps", "# logs", 1))
    run = lambda *extra: subprocess.run([sys.executable, "-m", "pipeline", "params", *extra, str(path)],  # noqa: E731
                                        cwd=ROOT, capture_output=True, text=True)
    checked = run("--check")
    assert checked.returncode == 1 and "differ from the schema" in checked.stdout
    assert run().returncode == 0
    assert path.read_text() == PARAMS.read_text()
