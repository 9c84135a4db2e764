"""Orchestration only (DESIGN.md §2, §5): Prefect flows and deployments, DVC calls, the command line.

May import prefect, dask, ``shards`` (to read summaries) and run subprocesses; never torch, ``models`` or
``stages``: the stages run under ``dvc repro`` in their own processes, and this package reads their JSON.

The stages it starts inherit ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise (see the Makefile:
spinning OpenMP threads stall each other on a busy machine).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
