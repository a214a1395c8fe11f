"""Data-parallel training without DDP: every rank holds full models and its shard of a global batch.

DistributedDataParallel wraps one module and syncs on backward; OSV has two optimised
models (student LoRA/unfrozen layers and discriminator heads) and alternating steps, so
gradients are averaged by hand after each backward (`average_gradients`). With equal shards
and per-shard mean losses, the average equals the gradient of the global-batch mean:
2 processes x batch b match 1 process x batch 2b within float tolerance.

The environment is torchrun's / submitit's (TorchDistributedEnvironment().export()):
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available() and os.environ.get("OSV_FORCE_CPU", "") != "1"
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set (use torchrun or submitit's "
                                   "TorchDistributedEnvironment().export())")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(global_items: list, env: DistEnv) -> list:
    """This rank's contiguous slice of a global batch (sizes must divide evenly)."""
    if len(global_items) % env.world_size:
        raise ValueError(f"global batch {len(global_items)} does not split over {env.world_size} ranks")
    per = len(global_items) // env.world_size
    return global_items[env.rank * per:(env.rank + 1) * per]


def average_gradients(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """All-reduce the mean of every parameter's gradient (one flat buffer, one collective)."""
    if not env.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def mean_scalars(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average logged scalars over ranks (rank 0 logs the global numbers)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist())}


def any_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank when any rank raised the flag (a signal, a non-finite loss)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _collective_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")
