"""Random access to manifest rows with bounded memory, and a reproducible epoch order.

Training needs shuffled access to images stored in Parquet shards. Reading one row costs a whole row group, so the
order is a *block shuffle*: row groups are shuffled, then rows are shuffled within a window of ``window`` groups.
A reader that caches the last ``window + 1`` row groups then reads every group once per epoch, and memory is bounded
by the window, never by the dataset. The order is a pure function of (seed, epoch), so a resumed run continues the
exact data order of the interrupted one without storing it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq


class RowIndex:
    """(file, row group, row) of every row of some shard files, from the footers only."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        refs = []
        for file_number, path in enumerate(self.paths):
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                refs.extend((file_number, group, row) for row in range(meta.row_group(group).num_rows))
        self.refs = np.asarray(refs, dtype=np.int64).reshape(-1, 3)  # (N, 3)

    def __len__(self) -> int:
        return len(self.refs)

    def groups(self) -> np.ndarray:
        """A group id per row (rows of one row group share it)."""
        _, group_ids = np.unique(self.refs[:, :2], axis=0, return_inverse=True)
        return group_ids.reshape(-1)


def block_shuffle(index: RowIndex, *, seed: int, epoch: int, window: int = 4) -> np.ndarray:
    """A permutation of ``range(len(index))``: groups shuffled, rows shuffled within windows of groups."""
    rng = np.random.default_rng([seed, epoch])
    group_ids = index.groups()
    order_of_groups = rng.permutation(group_ids.max() + 1 if len(group_ids) else 0)
    rows_by_group = {g: np.flatnonzero(group_ids == g) for g in order_of_groups}
    out = []
    for start in range(0, len(order_of_groups), window):
        block = np.concatenate([rows_by_group[g] for g in order_of_groups[start:start + window]])
        out.append(rng.permutation(block))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class RowReader:
    """Reads single rows by number through an LRU cache of decoded row groups."""

    def __init__(self, index: RowIndex, columns: list[str] | None = None, cache_groups: int = 5):
        self.index = index
        self.columns = columns
        self.cache_groups = cache_groups
        self._cache: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()
        self._files: dict[int, pq.ParquetFile] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: reopen files in the worker
        state = dict(self.__dict__)
        state["_cache"], state["_files"] = OrderedDict(), {}
        return state

    def row(self, number: int) -> dict[str, Any]:
        file_number, group, row = (int(v) for v in self.index.refs[number])
        key = (file_number, group)
        rows = self._cache.get(key)
        if rows is None:
            handle = self._files.get(file_number)
            if handle is None:
                handle = self._files[file_number] = pq.ParquetFile(self.index.paths[file_number])
            rows = handle.read_row_group(group, columns=self.columns).to_pylist()
            self._cache[key] = rows
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return rows[row]
