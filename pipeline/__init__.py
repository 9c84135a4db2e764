"""Orchestration only (DESIGN.md §2, §5): Prefect flows and deployments, DVC calls, the command line.

May import prefect, dask, ``shards`` (to read summaries) and run subprocesses; never torch, ``models`` or
``stages``: the stages run under ``dvc repro`` in their own processes, and this package reads their JSON.
"""
