"""The process group a tensor-parallel graph runs in: its rank, size and name, and the device
its collectives use.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import ProcessGroupError, WorldSizeError, WorldSizeMismatchError


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    world_size: int
    group_name: str


def check_world_size(world_size: object, where: str = "fxtp.transform") -> int:
    """`world_size` as an int >= 1, else `WorldSizeError` naming the value: a float, a string,
    a bool or None would otherwise fail deep inside the solver with a bare TypeError."""
    if isinstance(world_size, bool) or not hasattr(world_size, "__index__"):
        raise WorldSizeError(f"{where}: world_size must be an int >= 1 (the number of ranks), got "
                    f"{world_size!r} ({type(world_size).__name__}); pass e.g. "
                    "torch.distributed.get_world_size()")
    world_size = operator.index(world_size)
    if world_size < 1:
        raise WorldSizeError(f"world_size must be >= 1, got {world_size}")
    return world_size


def resolve_group(world_size: int, group: Optional[dist.ProcessGroup] = None) -> GroupInfo:
    """This process's rank and the group's name; checks the group matches `world_size`."""
    world_size = check_world_size(world_size)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ProcessGroupError(f"group must be a torch.distributed.ProcessGroup (e.g. from "
                                f"dist.new_group), got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        if world_size == 1 and group is None:
            return GroupInfo(rank=0, world_size=1, group_name="")
        raise ProcessGroupError(
            f"fxtp.transform(world_size={world_size}) needs an initialised torch.distributed "
            "process group: call torch.distributed.init_process_group(...) first (gloo on CPU, "
            "nccl on GPU), or launch with torchrun. fxtp.plan(...) works without one."
        )
    group = group or dist.group.WORLD
    size = dist.get_world_size(group)
    if size != world_size:
        raise WorldSizeMismatchError(
            f"world_size={world_size} but the process group has {size} ranks: pass "
            f"world_size={size}, or a group= of {world_size} ranks."
        )
    return GroupInfo(rank=dist.get_rank(group), world_size=size, group_name=group.group_name)


def named_group(name: str) -> Optional[dist.ProcessGroup]:
    """The process group of that name (`GroupInfo.group_name`: a group of one rank too, which
    a second transform for the same ranks must be given, the default group being larger);
    None for no name."""
    return dist.distributed_c10d._resolve_process_group(name) if name else None


def collective_device(group: "Optional[dist.ProcessGroup] | str" = None) -> torch.device:
    """The device of the tensors a collective over `group` (a group or its name) takes: the
    current CUDA device for NCCL (which rejects CPU tensors), the CPU otherwise (gloo). fxtp's
    own collectives outside the graph (load's agreement flag, the generator's prompt check) put
    their small tensors there."""
    if isinstance(group, str):
        group = named_group(group)
    backend = str(dist.get_backend(group)).lower() if dist.is_initialized() else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
