"""The training loop's shared parts, used by ``train_classifier`` and ``train_segmenter`` alike.

Each stage writes its loop out (``while step < iterations:`` with plain ``if step % n == 0:`` lines for logging,
evaluation and checkpoints, DESIGN.md §6); what both loops do the same way lives here: the optimizer and its
schedule (METHODS.md §1: linear warm-up, poly decay), the resumable, rank-sharded batch order and its loader, the
micro-batches of one optimizer step (autocast, gradient accumulation, DDP sync on the last), the dvclive logging,
and the resume checkpoint (model, optimizer, scheduler, RNG states, step).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config.schema import OptimConfig
from shards.sampling import RowIndex, block_shuffle
from training import runtime as rt
from training.checkpoint import save_checkpoint


def make_optimizer(backbone: list, heads: list, p: OptimConfig) -> torch.optim.Optimizer:
    """``p.optimizer`` over two groups: the backbone at ``lr``, the heads at ``lr * head_lr_mult``."""
    groups = [{"params": backbone, "lr": p.lr}, {"params": heads, "lr": p.lr * p.head_lr_mult}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.AdamW(groups, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)


def lr_factor(step: int, p: OptimConfig) -> float:
    """Linear warm-up from warmup_ratio to 1, then poly decay to 0 at ``iterations``.

    ``poly_over``: ``after_warmup`` decays over the steps after warm-up, (1 - (step - warmup) / (iterations -
    warmup))^power, continuous at the end of warm-up; ``whole`` is the ToCo code's PolyWarmupAdamW,
    (1 - step / iterations)^power, which drops from 1 to (1 - warmup / iterations)^power when warm-up ends
    (VOC: 0.932) and stays ~7 % below the other form until the end.
    """
    if step < p.warmup_iters:
        return p.warmup_ratio + (1 - p.warmup_ratio) * step / p.warmup_iters
    if p.poly_over == "whole":
        return max(0.0, 1 - step / p.iterations) ** p.poly_power
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


def batch_stream(dataset: Dataset, rows: np.ndarray, index: RowIndex, *, seed: int, p: OptimConfig, step: int,
                 env: rt.Runtime, num_workers: int) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from optimizer step ``step`` on; ``dataset`` is indexed by (epoch, row)."""
    order = batches(rows, index, seed=seed, batch=p.batch_size, start=step * p.grad_accum, rank=env.rank,
                    world=env.world_size)
    # Its own generator: creating the loader must not draw from the global RNG (resume equality).
    loader = DataLoader(dataset, batch_sampler=order, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=num_workers > 0)
    return iter(loader)


def accumulate(wrapped: torch.nn.Module, data: Iterator[dict[str, Any]], p: OptimConfig, env: rt.Runtime,
               bf16: bool, losses_of: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
               ) -> tuple[dict[str, torch.Tensor], int]:
    """The micro-batches of one optimizer step: forward under autocast, backward of ``total / grad_accum``; under
    DDP the gradients sync on the last micro-batch only. Returns the last losses and the images seen (all ranks)."""
    seen = 0
    for micro in range(p.grad_accum):
        batch = next(data)
        last = micro == p.grad_accum - 1
        with contextlib.nullcontext() if (last or not env.distributed) else wrapped.no_sync():
            with env.autocast(bf16):
                losses = losses_of(batch)
            (losses["total"] / p.grad_accum).backward()
        seen += batch["image"].shape[0] * env.world_size
    return losses, seen


def step_optimizer(optimizer: torch.optim.Optimizer, scheduler) -> None:
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def open_live(live_dir: str | Path | None, env: rt.Runtime, resumed: bool):
    """dvclive on the main rank (``None`` elsewhere or without a folder); ``dvcyaml=False``: dvc.yaml is ours."""
    if not env.is_main or not live_dir:
        return None
    from dvclive import Live

    return Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=resumed)


class Throughput:
    """Images per second since the last report (training images of every rank)."""

    def __init__(self) -> None:
        self.seen, self.tick = 0, time.perf_counter()

    def report(self) -> float:
        rate = self.seen / max(time.perf_counter() - self.tick, 1e-9)
        self.seen, self.tick = 0, time.perf_counter()
        return rate


def log_losses(live, bar, losses: dict[str, torch.Tensor], lr: float, images_per_s: float) -> None:
    """One dvclive step of the training curves (``train/loss_<name>``, lr, images/s) and the bar's postfix."""
    if live is not None:
        for name, value in losses.items():
            live.log_metric(f"train/loss_{name}", float(value.detach()))
        live.log_metric("train/lr", lr)
        live.log_metric("train/images_per_s", images_per_s)
        live.next_step()
    bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}", ips=f"{images_per_s:.0f}")


def save_resume_state(path: Path, env: rt.Runtime, step: int, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler, generator: torch.Generator | None = None) -> None:
    """The resume checkpoint (atomic, main rank), then a barrier. ``generator``: a per-rank generator whose state
    every rank contributes (gathered), so that each rank resumes its own random stream."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if generator is not None:
        generators = [torch.empty(0)] * env.world_size
        if env.distributed:
            torch.distributed.all_gather_object(generators, generator.get_state())
        else:
            generators = [generator.get_state()]
        state["generator"] = generators
    if env.is_main:
        save_checkpoint(path, {**state, "torch_rng": torch.get_rng_state(), "step": step})
    rt.barrier(env)
