"""Device, precision and distributed set-up shared by the training stages.

``torchrun --nproc_per_node N -m stages.train_classifier ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a
process group (NCCL on CUDA, gloo on CPU) and every rank trains on its slice of the global batch order. Without
those variables everything runs in one process.

Precision: the ``bf16`` params (``train_classifier.loop.bf16``, ``dump_cams.bf16``, ...) turn on bf16 autocast on
CUDA. The CPU runs fp32 (bf16 matmuls are slow on most CPUs) unless the environment variable ``WSSS_CPU_BF16=1``
forces CPU bf16 autocast: the test suite and ``bench/gpu_check.sh --device cpu`` use it so that the GPU's
mixed-precision code path (dtype mismatches, fp32 islands) runs on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


CPU_BF16_ENV = "WSSS_CPU_BF16"


def cpu_bf16_forced() -> bool:
    """True when ``WSSS_CPU_BF16`` is set to 1/true/yes: CPU autocast in bf16, as on a GPU."""
    return os.environ.get(CPU_BF16_ENV, "").strip().lower() in ("1", "true", "yes")


def autocast_for(device: torch.device, enabled: bool = True, cpu_bf16: bool | None = None):
    """The autocast context of a ``bf16`` param on ``device``: bf16 on CUDA; on CPU bf16 only when forced
    (``cpu_bf16``, default: the ``WSSS_CPU_BF16`` environment variable), else plain fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and (cpu_bf16_forced() if cpu_bf16 is None else cpu_bf16):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    cpu_bf16: bool = False  # CPU autocast in bf16 (WSSS_CPU_BF16=1): the GPU's precision path on a CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self, enabled: bool = True):
        """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmuls are slow on most CPUs) unless ``cpu_bf16``."""
        return autocast_for(self.device, enabled, self.cpu_bf16)

    def precision(self, enabled: bool = True) -> str:
        """'bf16' or 'fp32': what :meth:`autocast` runs (results and fingerprints depend on it)."""
        return "bf16" if enabled and (self.device.type == "cuda" or self.cpu_bf16) else "fp32"


def setup_runtime(device: str = "auto", num_threads: int = 0) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    elif world_size > 1 and torch_device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return Runtime(torch_device, rank, world_size, cpu_bf16=torch_device.type == "cpu" and cpu_bf16_forced())


def all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
