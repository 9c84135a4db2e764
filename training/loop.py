"""The training loop's shared parts: the learning-rate schedule and the resumable, rank-sharded batch order.

Used by ``train_classifier`` and ``train_segmenter`` alike (METHODS.md §1 schedule: linear warm-up, poly decay).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from shards.sampling import RowIndex, block_shuffle


def lr_factor(step: int, p: Any) -> float:
    """Linear warm-up from warmup_ratio to 1, then poly decay to 0 at ``iterations``."""
    if step < p.warmup_iters:
        return p.warmup_ratio + (1 - p.warmup_ratio) * step / p.warmup_iters
    span = max(1, p.iterations - p.warmup_iters)
    return max(0.0, 1 - (step - p.warmup_iters) / span) ** p.poly_power


def batches(rows: np.ndarray, index: RowIndex, *, seed: int, batch: int, start: int, rank: int,
            world: int) -> Iterator[list[tuple[int, int]]]:
    """Micro-batches of (epoch, row) for this rank from micro-step ``start`` on; order = f(seed, epoch)."""
    tagged = set(rows.tolist())
    orders: dict[int, np.ndarray] = {}
    micro = start
    while True:
        picks = []
        for g in range(micro * batch * world + rank * batch, micro * batch * world + (rank + 1) * batch):
            epoch, position = divmod(g, len(rows))
            if epoch not in orders:
                orders = {epoch: np.array([r for r in block_shuffle(index, seed=seed, epoch=epoch)
                                           if r in tagged])}
            picks.append((epoch, int(orders[epoch][position])))
        yield picks
        micro += 1
