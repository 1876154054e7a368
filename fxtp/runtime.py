"""Process-group handling and the collectives the rewritten graph calls.

The graph calls `torch.ops._c10d_functional.all_reduce` + `wait_tensor` by group name: functional
collectives are traceable, so the rewritten graph composes with torch.compile, and the group is
resolved by name at run time rather than captured as a Python object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import ProcessGroupError, WorldSizeMismatchError

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    world_size: int
    group_name: str


def resolve_group(world_size: int, group: Optional[dist.ProcessGroup] = None) -> GroupInfo:
    """This process's rank and the group's name; checks the group matches `world_size`."""
    if world_size < 1:
        raise ProcessGroupError(f"world_size must be >= 1, got {world_size}")
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
