"""bench/gpu_check.sh --device cpu --quick: the GPU readiness check runs end to end on a CPU (so it cannot rot), with
the packages a bare GPU machine lacks made unimportable, and writes every section of its results file."""

import json
import math
import os
import subprocess
import textwrap

import pytest
from conftest import ROOT

# Not on the lent GPU machines (DESIGN.md §2): the check's import closure must not need them.
ABSENT_ON_GPU = ("dvc", "dvclive", "prefect", "pydensecrf", "pydensecrf2", "datasets", "dask", "distributed")
SECTIONS = ("environment", "toco_fp32_eager", "toco_bf16_sdpa", "toco_bf16_compile", "toco_train_steps", "cam_dump",
            "deeplab_train")


def blocker(folder):
    """A sitecustomize that makes ABSENT_ON_GPU unimportable in every Python the script starts, logging attempts."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, os, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT_ON_GPU!r}:
                    with open(os.environ["GPU_CHECK_BLOCKED_LOG"], "a") as log:
                        log.write(name + "\\n")
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        open(os.environ["GPU_CHECK_BLOCKER_ON"], "w").close()
    """))
    return folder


@pytest.mark.slow  # ~35 s of one core: the whole check at toy sizes
def test_gpu_check_quick_on_cpu_without_the_pipeline_packages(tmp_path):
    out = tmp_path / "results" / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(blocker(tmp_path / "site")),
           "GPU_CHECK_BLOCKED_LOG": str(tmp_path / "blocked.log"), "GPU_CHECK_BLOCKER_ON": str(tmp_path / "on")}
    env.pop("WSSS_CPU_BF16", None)  # the script sets it itself for --device cpu
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "on").exists()  # the blocker really ran in the script's interpreter
    blocked = (tmp_path / "blocked.log").read_text().split() if (tmp_path / "blocked.log").exists() else []
    assert blocked == [], f"the GPU check tried to import {sorted(set(blocked))}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert set(SECTIONS) <= set(sections)
    for name in SECTIONS:
        assert sections[name]["status"] == "ok", (name, sections[name].get("error"))
    assert sections["environment"]["cpu_bf16_autocast"] and sections["environment"]["ctc_form"] == "reference"
    for name in ("toco_fp32_eager", "toco_bf16_sdpa", "toco_bf16_compile"):
        figures = sections[name]["batch_4"]
        assert figures["batch"] == 4 and figures["images_per_s"] > 0 and math.isfinite(figures["loss"])
    assert sections["toco_bf16_sdpa"]["largest"]["batch"] == 8  # the search ran (capped at 8 on a CPU)
    train = sections["toco_train_steps"]
    assert train["steps_done"] == train["steps_planned"] == 12 and train["no_nan"]
    assert math.isfinite(train["cls_last"]) and math.isfinite(train["total_last"])
    assert train["loss_fell"] or train["cls_last"] < 1.0  # 12 toy steps: falling, or at least sane
    assert train["cams"]["finite"] and train["cams"]["non_degenerate"]
    assert sections["cam_dump"]["images"] > 0 and sections["cam_dump"]["last_cam_finite"]
    assert sections["deeplab_train"]["fp32"]["images_per_s"] > 0 and sections["deeplab_train"]["bf16"]["loss"] > 0
    goals = results["goals"]
    assert goals["toco_train_images_per_s"][0] == 45.0 and goals["toco_train_images_per_s"][1]
    assert goals["cam_dump_images_per_s"] == [150.0, sections["cam_dump"]["images_per_s"]]
    assert "| performance goal (one H100) | goal | measured here |" in results["summary_markdown"]
    assert "toco_train_steps" in proc.stdout  # the summary is printed too
