from dataclasses import dataclass

from shards import fingerprint as fingerprint_module
from shards.fingerprint import (PROJECT_ROOT, classifier_fingerprint, code_version, fingerprint, hash_inputs,
                                import_closure, sha256_file)


@dataclass(frozen=True)
class Cfg:
    a: int = 1


def test_fingerprint_changes_with_params_code_and_inputs(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    base = fingerprint(Cfg(), code="c1", inputs=[f])
    assert base == fingerprint(Cfg(), code="c1", inputs=[f])
    assert base != fingerprint(Cfg(a=2), code="c1", inputs=[f])
    assert base != fingerprint(Cfg(), code="c2", inputs=[f])
    f.write_bytes(b"two")
    assert base != fingerprint(Cfg(), code="c1", inputs=[f])


def test_shard_folder_is_hashed_by_its_index(tmp_path):
    (tmp_path / "index.json").write_text('{"shards": {}}')
    (tmp_path / "big.parquet").write_bytes(b"x" * 1000)
    before = hash_inputs([tmp_path])
    (tmp_path / "big.parquet").write_bytes(b"y" * 1000)  # the index, not the bytes, identifies a shard set
    assert hash_inputs([tmp_path]) == before
    (tmp_path / "index.json").write_text('{"shards": {"a": 1}}')
    assert hash_inputs([tmp_path]) != before


def test_import_closure_follows_imports_and_nothing_else():
    closure = {p.relative_to(PROJECT_ROOT).as_posix() for p in import_closure("stages.train_classifier")}
    assert {"stages/train_classifier.py", "training/loop.py", "models/toco.py", "models/__init__.py",
            "config/schema.py", "shards/fingerprint.py"} <= closure
    # the segmenter's code is not the classifier's: editing it must not invalidate the classifier's checkpoints
    assert not closure & {"stages/train_segmenter.py", "training/segmenter_data.py", "models/deeplab.py"}
    assert all(p.endswith(".py") for p in closure)


def test_code_version_changes_with_a_file_of_the_closure_only(tmp_path, monkeypatch):
    (tmp_path / "stages").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "stages" / "a.py").write_text("from shards import b\n\ndef f():\n    import shards.c\n")
    (tmp_path / "shards" / "b.py").write_text("X = 1\n")
    (tmp_path / "shards" / "c.py").write_text("Y = 1\n")  # imported inside a function: still code a runs
    (tmp_path / "shards" / "d.py").write_text("Z = 1\n")  # imported by nobody
    monkeypatch.setattr(fingerprint_module, "PROJECT_ROOT", tmp_path)
    assert [p.name for p in import_closure("stages.a")] == ["b.py", "c.py", "a.py"]
    before = code_version("stages.a")
    assert len(before) == 64 and before == code_version("stages.a")
    (tmp_path / "shards" / "d.py").write_text("Z = 2\n")
    assert code_version("stages.a") == before
    (tmp_path / "shards" / "c.py").write_text("Y = 2\n")
    assert code_version("stages.a") != before


def test_classifier_fingerprint_covers_weights_and_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    first = classifier_fingerprint(tmp_path)
    assert len(first) == 32 and first == classifier_fingerprint(tmp_path)
    assert sha256_file(tmp_path / "config.json") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    (tmp_path / "config.json").write_text('{"k": 1}')
    assert classifier_fingerprint(tmp_path) != first
