"""shard_map.prestart: the pool's forkserver imports the target's module before the pool is asked for, and the
pool's workers fork from that server (relabel starts it before its dump, so refine's pool starts at once)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from config.schema import RuntimeConfig
from parallel.shard_map import will_pool

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from config.schema import RuntimeConfig
    from parallel import shard_map

    marker = Path(sys.argv[1])
    shard_map.prestart("tests.parallel.prestart_target:square")
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:  # the server imports the module on its own
        time.sleep(0.05)
    server = int(marker.read_text().split()[0])
    results = dict(shard_map.map_tasks("tests.parallel.prestart_target:square", [1, 2, 3, 4],
                                       RuntimeConfig(num_workers=2, num_threads=1)))
    print(json.dumps([server, sorted(v for v, _ in results.values()), sorted({p for _, p in results.values()})]))
""")


def test_prestarted_server_imports_the_target_and_forks_the_workers(tmp_path):
    marker = tmp_path / "imports.txt"
    env = {**os.environ, "WSSS_TEST_PRESTART_MARKER": str(marker), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(marker)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    server, squares, parents = json.loads(done.stdout.strip().splitlines()[-1])
    assert squares == [1, 4, 9, 16]
    assert parents == [server]  # every worker is a child of the prestarted server
    pids = [int(pid) for pid in marker.read_text().split()]
    assert pids[0] == server  # the server imported the target first, before the pool was asked for
    assert len(pids) == 2  # the server and this process (resolve): the workers inherit the module, no new import


def test_will_pool_follows_map_tasks():
    assert will_pool(2, RuntimeConfig(num_workers=2))
    assert not will_pool(1, RuntimeConfig(num_workers=2))  # one task: in-process
    assert not will_pool(8, RuntimeConfig(num_workers=1))
    assert not will_pool(8, RuntimeConfig(num_workers=2, executor="dask"))  # Dask, not the pool
    assert not will_pool(8, RuntimeConfig(num_workers=4), workers=1)
