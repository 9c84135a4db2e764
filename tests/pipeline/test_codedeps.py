"""dvc.yaml's code deps follow the import graph: every file a stage imports is a dep, and the list is the
generated one (`python -m pipeline deps`), so an edit reruns exactly the stages that import the edited file."""

import re
import subprocess
import sys

from pipeline.codedeps import covered, generate, stage_deps, stale_stages
from shards.fingerprint import PROJECT_ROOT, import_closure

DVC_YAML = (PROJECT_ROOT / "dvc.yaml").read_text()


def stage_entries() -> dict[str, list[str]]:
    """stage module -> its deps entries, read from dvc.yaml by a plain YAML parse (not by the generator's parser)."""
    import yaml

    stages = yaml.safe_load(DVC_YAML)["stages"]
    out = {}
    for stage in stages.values():
        body = stage.get("do", stage)
        module = re.search(r"python -m (stages\.\w+)", body["cmd"]).group(1)
        out[module] = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
    return out


def test_every_stage_depends_on_its_whole_import_closure():
    entries = stage_entries()
    assert len(entries) == 9
    for module, deps in entries.items():
        missing = [p.relative_to(PROJECT_ROOT).as_posix() for p in import_closure(module)
                   if p not in covered(deps) and p.stat().st_size]
        assert not missing, f"{module}: imports files dvc.yaml does not list: {missing}"


def test_dvc_yaml_holds_the_generated_code_deps():
    assert stale_stages(DVC_YAML) == [], "run `python -m pipeline deps`"


def test_a_stage_does_not_depend_on_code_it_does_not_import():
    classifier = covered(stage_entries()["stages.train_classifier"])
    assert PROJECT_ROOT / "stages" / "train_segmenter.py" not in classifier
    assert PROJECT_ROOT / "models" / "deeplab.py" not in classifier


def test_generate_restores_a_dropped_dep_and_keeps_data_deps_and_comments():
    module = "stages.refine"
    first = stage_deps(module)[0]
    start = DVC_YAML.index("\n  refine:\n")  # drop it from refine's deps (other stages list it too)
    broken = DVC_YAML[:start] + DVC_YAML[start:].replace(f"      - {first}\n", "", 1)
    assert broken != DVC_YAML
    assert stale_stages(broken) and module in stale_stages(broken)
    fixed = generate(broken)
    assert fixed == DVC_YAML
    assert "# The pipeline DAG" in fixed and "      - data/cams\n" in fixed


def test_check_command_exit_status(tmp_path):
    good = tmp_path / "dvc.yaml"
    good.write_text(DVC_YAML)
    run = lambda: subprocess.run([sys.executable, "-m", "pipeline", "--root", str(tmp_path), "deps", "--check"],  # noqa: E731
                                 cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run().returncode == 0
    good.write_text(DVC_YAML.replace("      - stages/refine.py\n", "", 1))
    result = run()
    assert result.returncode == 1 and "stages.refine" in result.stdout
