"""Imported only by the forkserver of :func:`parallel.shard_map.map_tasks` (a preload): the server dies with the stage.

The stage process starts the forkserver, and the forkserver forks the pool workers. Python's forkserver exits when
the "parent alive" pipe reaches end-of-file, but every worker it forks holds a copy of that pipe's write end, so a
SIGKILLed stage would leave the server and its workers running (and writing shards) for as long as they like. This
module, imported in the server before it forks anything, asks the kernel for SIGKILL when the stage dies
(``PR_SET_PDEATHSIG``); the workers ask for SIGTERM when the server dies (``shard_map._setup_worker``).
"""

import os
import signal

from parallel.shard_map import PARENT_PID_ENV, die_with_parent

_parent = os.environ.get(PARENT_PID_ENV, "")
die_with_parent(signal.SIGKILL, int(_parent) if _parent.isdigit() else None)
