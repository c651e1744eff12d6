"""Where a training process stands in a run, and what its ranks share: `torchrun` starts one process per GPU (or
CPU rank); a plain `dfpipe train` is a world of one, for which every helper here is a no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .faces import resolve_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank among ``world`` processes, and the device it trains on."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `dfpipe train` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    resolved = resolve_device(device)
    if world > 1:
        if resolved.type == "cuda":
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Ranks(rank, world, resolved)


def gather(obj, ctx: Ranks) -> list:
    """Every rank's ``obj``, in rank order (picklable objects of any size: shards of the val set are uneven)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def from_main(obj, ctx: Ranks):
    """Rank 0's ``obj`` on every rank, so decisions taken from files are taken once."""
    if ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module, ctx: Ranks) -> None:
    """Rank 0's BatchNorm statistics on every rank. DDP broadcasts buffers at the start of each training forward,
    so after the epoch's last step every rank's have moved on its own batch: validation must score every rank's
    share with the model rank 0 saves."""
    if ctx.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def any_rank(flag: bool, ctx: Ranks) -> bool:
    value = torch.tensor(float(flag), device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wrap(model: torch.nn.Module, ctx: Ranks):
    """DDP registers the parameters that require grad when it is built, so it is rebuilt when the backbones are
    frozen or unfrozen."""
    if ctx.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
