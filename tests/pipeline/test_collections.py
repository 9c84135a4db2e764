"""Registering collections (a local folder, an fsspec URL), their names, the DAG order, the locks: no Prefect needed."""

import os

import fsspec
import pytest
import yaml
from conftest import make_project, run, tiny_params

from pipeline import dvc
from pipeline.collections import copy_into, file_lock, inbox_folders, register
from shards.collections import check_name, name_from_path, read_collections


def test_names():
    assert name_from_path("/photos/My Holiday 2024/") == "my-holiday-2024"
    assert name_from_path("s3://bucket/street_views") == "street_views"
    assert check_name("batch-0001") == "batch-0001"
    for bad in ("", "Upper", "has space", "-lead", "x" * 64, "a/b"):
        with pytest.raises(ValueError, match="collection name"):
            check_name(bad)


def test_copy_from_an_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/coll/a.jpg": b"1", "/coll/sub/b.png": b"2", "/coll/.hidden/c.jpg": b"3"})
    assert copy_into("memory://coll", tmp_path / "out") == 2
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["a.jpg", "sub/b.png"]
    with pytest.raises(ValueError, match="not a folder"):
        copy_into("memory://coll/a.jpg", tmp_path / "other")


def test_register_makes_a_dvc_input_and_a_relabel_stage(tmp_path):
    project = make_project(tmp_path / "project", tiny_params())
    source = tmp_path / "My Photos"
    source.mkdir()
    (source / "a.jpg").write_bytes(b"\xff\xd8 not decoded here")
    (project / "data/inbox/dropped").mkdir(parents=True)
    (project / "data/inbox/dropped/b.png").write_bytes(b"png")
    (project / "data/inbox/empty").mkdir()
    assert inbox_folders(project, "data/inbox") == ["dropped"]  # a folder without images is not a collection

    assert register(project, str(source), None, "data/inbox", log=lambda _: None) == "my-photos"
    assert register(project, None, "dropped", "data/inbox", log=lambda _: None) == "dropped"
    assert read_collections(project) == ["dropped", "my-photos"]
    assert (project / "data/inbox/my-photos/a.jpg").exists() and (project / "data/inbox/my-photos.dvc").exists()
    assert yaml.safe_load((project / "collections.yaml").read_text()) == {"collections": ["dropped", "my-photos"]}
    stages = run(["dvc", "stage", "list", "--name-only"], project).stdout.split()
    assert {"relabel@dropped", "relabel@my-photos"} <= set(stages)
    assert "relabel@dropped" not in dvc.stage_order(project)  # produce runs the training DAG only
    with pytest.raises(ValueError, match="already exists"):
        register(project, str(source), "dropped", "data/inbox", log=lambda _: None)


class FakeClock:
    """pipeline.collections' ``time``: ``sleep`` advances ``monotonic`` at once, and is recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_file_lock_polls_until_its_timeout_while_held(tmp_path, monkeypatch):
    import pipeline.collections

    clock = FakeClock()
    monkeypatch.setattr(pipeline.collections, "time", clock)
    path = tmp_path / "x.lock"
    with file_lock(path) as held:  # a second open() of the file: flock conflicts even within one process
        assert held and clock.sleeps == []
        with file_lock(path, timeout=0.3, poll_s=0.05) as acquired:
            assert not acquired
        assert set(clock.sleeps) == {0.05} and 0.3 <= clock.now <= 0.3 + 0.05 + 1e-9  # polled up to the deadline
        with file_lock(path, timeout=0) as acquired:
            assert not acquired
    with file_lock(path, timeout=0) as acquired:  # released: taken at once
        assert acquired
    assert path.read_text() == f"{os.getpid()}\n"


def test_progress_lines_are_recognised():
    assert dvc.PROGRESS.match("refine:  45%|####5     | 9/20 [00:03<00:04,  2.61img/s]")["pct"] == "45"
    assert dvc.PROGRESS.match("INFO refine: refine ['par', 'crf']: 5 images") is None
