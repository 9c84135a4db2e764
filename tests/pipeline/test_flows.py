"""The Prefect flows on copies of the session's trained tiny project (real dvc in a temporary git repository), against
the session's test harness.

relabel_inbox registers a dropped folder, relabels it with the trained classifier (predicted tags, a broken image in
the rejects artifact), pushes, leaves `dvc status` clean, and finds nothing to do the second time; a busy collection
is skipped with a message; produce runs stages one task each (an up-to-date one is not rerun) and publishes its
artifacts.
"""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run

from pipeline import dvc
from pipeline.collections import collection_lock
from shards.collections import read_collections, read_current
from tests.pipeline.helpers import artifacts_of, relabel_project

pytestmark = pytest.mark.slow  # a Prefect test server and `dvc repro` subprocesses
pytest.importorskip("pydensecrf.densecrf")


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory):
    return relabel_project(trained_project.root, tmp_path_factory.mktemp("flows") / "project", {"holiday": 5})


def by_key(artifacts) -> dict:
    found = {}
    for artifact in artifacts:
        found.setdefault(artifact.key, []).append(artifact)
    return found


def test_relabel_inbox_relabels_a_new_folder_once(prefect_harness, project):
    from pipeline.flows import relabel_inbox

    state = relabel_inbox(str(project), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["relabelled"] == ["holiday"] and result["rejects"] == 1 and result["pushed"] is True
    assert read_collections(project) == ["holiday"] and (project / "data/inbox/holiday.dvc").exists()
    current = read_current(project / "data/collections", "holiday")
    summary = current["summary"]
    assert summary["images"] == 5 and summary["predicted"] + summary["no_known_class"] == 5
    assert summary["rejects"] == 1
    version = project / "data/collections/holiday" / current["version"]
    rows = [r for p in sorted((version / "pseudo_labels").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 5 and all(r["tag_source"] in ("predicted", "unknown") for r in rows)
    status = run(["dvc", "status", "--json"], project).stdout  # relabel@holiday, its input and the training DAG
    assert json.loads(status or "{}") == {}
    assert (project / ".dvc-remote").is_dir()  # pushed to the project's local remote

    children = [r for r in _runs("relabel") if r.parent_task_run_id is not None]
    artifacts = by_key(artifacts_of([state.state_details.flow_run_id, *[r.id for r in children]]))
    for key in ("relabel-inbox-summary", "relabel-inbox-rejects", "relabel-inbox-progress", "relabel-holiday-summary",
                "relabel-holiday-classes", "relabel-holiday-rejects", "relabel-holiday-tags",
                "relabel-holiday-gallery", "relabel-holiday-review", "relabel-holiday-progress"):
        assert key in artifacts, f"{key} missing from {sorted(k for k in artifacts if k)}"
    assert "broken" in json.dumps(artifacts["relabel-inbox-rejects"][0].data)
    assert "broken" in json.dumps(artifacts["relabel-holiday-rejects"][0].data)
    assert any(a.type == "markdown" and "](file://" in a.data for a in artifacts.get(None, []))  # link artifacts
    assert artifacts["relabel-inbox-progress"][0].data == 100.0
    assert "predicted" in artifacts["relabel-holiday-summary"][0].data
    page = version / "review.html"
    assert page.is_file() and f"`{page.resolve()}`" in artifacts["relabel-holiday-review"][0].data  # path in words
    assert "| review page |" in artifacts["relabel-holiday-summary"][0].data

    again = relabel_inbox(str(project), return_state=True)
    assert again.is_completed() and again.result()["relabelled"] == []
    summary_md = by_key(artifacts_of([again.state_details.flow_run_id]))["relabel-inbox-summary"][0].data
    assert "0 of 1 collections" in summary_md


def _runs(flow_name: str) -> list:
    from tests.pipeline.helpers import flow_runs_named

    return flow_runs_named(flow_name)


def test_a_second_run_on_a_busy_collection_skips_and_says_so(prefect_harness, project):
    from pipeline.flows import relabel

    if "holiday" not in read_collections(project):
        pytest.skip("needs the collection registered by the previous test")
    with collection_lock(project, "holiday", timeout=0) as acquired:
        assert acquired
        state = relabel("holiday", str(project), lock_wait_s=0.5, return_state=True)
    assert state.is_completed() and state.result()["status"] == "skipped"
    summary = by_key(artifacts_of([state.state_details.flow_run_id]))["relabel-holiday-summary"][0]
    assert "skipped: another run is relabelling holiday" in summary.data
    run(["dvc", "remote", "remove", "local"], project)
    unpushed = relabel("holiday", str(project), push_after=True)  # up to date; no remote: push skipped, no error
    assert unpushed["status"] == "up to date" and unpushed["pushed"] is False


def test_produce_runs_stages_in_dag_order_and_publishes(prefect_harness, trained_copy):
    from pipeline.flows import produce

    project = trained_copy
    order = dvc.stage_order(project)
    assert order[:3] == ["shapes", "prepare", "train_classifier"] and "refine" in order and "export" in order
    assert order.index("dump_cams") < order.index("refine") < order.index("export")
    assert not any("@" in stage for stage in order)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["rows_per_shard"] = 8  # prepare reruns; shapes is up to date
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = produce(str(project), ["shapes", "prepare"], return_state=True)
    assert state.is_completed(), state.message
    assert [r["ran"] for r in state.result()["stages"]] == [False, True]
    assert pq.read_table(project / "data/manifest/train-00000.parquet").num_rows == 8
    artifacts = by_key(artifacts_of([state.state_details.flow_run_id]))
    assert {"produce-summary", "produce-rejects", "produce-progress"} <= set(artifacts)
    assert "| prepare | yes |" in artifacts["produce-summary"][0].data
    assert "| shapes | up to date |" in artifacts["produce-summary"][0].data
    assert artifacts["produce-progress"][0].data == 100.0
