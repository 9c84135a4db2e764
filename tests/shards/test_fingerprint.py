from dataclasses import dataclass

from shards.fingerprint import code_version, fingerprint, hash_inputs


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


def test_code_version_is_stable_hex():
    assert code_version(("shards",)) == code_version(("shards",))
    assert len(code_version(("shards",))) == 64
