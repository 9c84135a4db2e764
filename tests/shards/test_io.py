import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.io import ShardSet, iter_rows, read_metadata, with_metadata, write_table_atomic

SCHEMA = with_metadata(pa.schema([("id", pa.int64()), ("payload", pa.binary())]), {"class_names": ["bg", "a"]})


def table(start, n):
    return pa.Table.from_pylist([{"id": i, "payload": bytes([i % 256]) * 100} for i in range(start, start + n)],
                                schema=SCHEMA)


def test_round_trip_is_identity_and_keeps_metadata(tmp_path):
    original = table(0, 50)
    write_table_atomic(original, tmp_path / "a.parquet")
    back = pq.read_table(tmp_path / "a.parquet")
    assert back.equals(original)
    assert read_metadata(tmp_path / "a.parquet")["class_names"] == ["bg", "a"]
    assert read_metadata(tmp_path / "a.parquet")["schema_version"] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_resume_skips_only_matching_intact_shards(tmp_path):
    shards = ShardSet(tmp_path)
    shards.write("s-00000.parquet", table(0, 10), fingerprint="f1")
    assert shards.is_done("s-00000.parquet", "f1")
    assert not shards.is_done("s-00000.parquet", "f2")  # params changed
    assert not shards.is_done("s-00001.parquet", "f1")  # never written
    with open(tmp_path / "s-00000.parquet", "r+b") as handle:  # a flipped byte
        handle.seek(20)
        byte = handle.read(1)
        handle.seek(20)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert not shards.is_done("s-00000.parquet", "f1")
    with pytest.raises(ValueError, match="sha256 does not match"):
        shards.verify()


def test_prune_removes_stale_shards_and_temp_files(tmp_path):
    shards = ShardSet(tmp_path)
    for i in range(3):
        shards.write(f"s-{i:05d}.parquet", table(i * 10, 10), fingerprint="f")
    (tmp_path / ".s-00003.parquet.abc.tmp").write_bytes(b"half")
    removed = shards.prune(["s-00000.parquet"])
    assert removed == ["s-00001.parquet", "s-00002.parquet"]
    assert [p.name for p in shards.files()] == ["s-00000.parquet"]
    assert list(shards.index()) == ["s-00000.parquet"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_streaming_reads_in_order(tmp_path):
    shards = ShardSet(tmp_path)
    for i in range(3):
        shards.write(f"s-{i:05d}.parquet", table(i * 10, 10), fingerprint="f", row_group_size=4)
    ids = [row["id"] for row in iter_rows(shards.files(), columns=["id"], batch_size=3)]
    assert ids == list(range(30))


def test_concurrent_writers_do_not_lose_index_entries(tmp_path):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.getcwd()!r})
        import pyarrow as pa
        from shards.io import ShardSet
        worker = int(sys.argv[1])
        shards = ShardSet({str(tmp_path)!r})
        for i in range(8):
            t = pa.table({{"id": [worker * 100 + i]}})
            shards.write(f"w{{worker}}-{{i:05d}}.parquet", t, fingerprint="f")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert len(ShardSet(tmp_path).index()) == 24


PAUSE_SCRIPT = """
import sys
import pyarrow as pa
from shards.io import ShardSet
shards = ShardSet(sys.argv[1])
for i in range(3):
    shards.write(f"s-{i:05d}.parquet", pa.table({"id": [i]}), fingerprint="f")
assert "torch" not in sys.modules  # shards never import torch
"""


def test_pause_point_stops_the_writer_after_its_nth_shard_and_is_a_no_op_unset(tmp_path):
    from conftest import ROOT, kill_when_paused, tool_env

    cmd = [sys.executable, "-c", PAUSE_SCRIPT, str(tmp_path / "paused")]
    kill_when_paused(cmd, "shard:2", cwd=ROOT, log=tmp_path / "paused.log")
    assert sorted(ShardSet(tmp_path / "paused").index()) == ["s-00000.parquet", "s-00001.parquet"]
    assert len(list((tmp_path / "paused").glob("*.parquet"))) == 2  # stopped after the 2nd, before the 3rd
    env = {**tool_env(), "WSSS_PAUSE_AFTER": "checkpoint:1"}  # another kind: shards do not stop
    proc = subprocess.run([*cmd[:3], str(tmp_path / "other")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(ShardSet(tmp_path / "other").index()) == 3


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    import os
    import stat

    from shards.io import atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.json", b"{}")
    (tmp_path / "plain.json").write_bytes(b"{}")  # what open() gives under this process's umask
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode)
