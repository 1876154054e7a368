"""Process-group handling and the collectives the rewritten graph calls.

The graph calls `torch.ops._c10d_functional.all_reduce` + `wait_tensor` by group name: functional
collectives are traceable, so the rewritten graph composes with torch.compile, and the group is
resolved by name at run time rather than captured as a Python object.
"""
from __future__ import annotations

import operator
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


def check_world_size(world_size: object, error: type = ProcessGroupError,
                     where: str = "fxtp.transform") -> int:
    """`world_size` as an int >= 1, else `error` naming the value: a float, a string, a bool or
    None would otherwise fail deep inside the solver with a bare TypeError."""
    if isinstance(world_size, bool) or not hasattr(world_size, "__index__"):
        raise error(f"{where}: world_size must be an int >= 1 (the number of ranks), got "
                    f"{world_size!r} ({type(world_size).__name__}); pass e.g. "
                    "torch.distributed.get_world_size()")
    world_size = operator.index(world_size)
    if world_size < 1:
        raise error(f"world_size must be >= 1, got {world_size}")
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


def collective_device(group: "Optional[dist.ProcessGroup] | str" = None) -> torch.device:
    """The device of the tensors a collective over `group` (a group or its name) takes: the
    current CUDA device for NCCL (which rejects CPU tensors), the CPU otherwise (gloo). fxtp's
    own collectives outside the graph (load's agreement flag, the generator's prompt check) put
    their small tensors there."""
    if isinstance(group, str):
        group = dist.distributed_c10d._resolve_process_group(group) if group else None
    backend = str(dist.get_backend(group)).lower() if dist.is_initialized() else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Autograd-aware collectives (Megatron's f and g), called by the rewritten graph.
#
# Each is a module-level function wrapping an `autograd.Function`, so an FX `call_function` node
# can name it and dynamo traces it with `fullgraph=True` (forward and backward are made of
# functional collectives and plain tensor ops). Without grad the functions call the forward's
# ops directly (see `_needs_autograd`): the inference graph is bare `all_reduce` + `wait_tensor`.

class _AllReduceSum(torch.autograd.Function):
    """g: sums a partial value over the ranks; the gradient of the sum is every summand's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        return WAIT(ALL_REDUCE(x, "sum", group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _CopyToRegion(torch.autograd.Function):
    """f: a replicated value entering sharded (or partial-sum) computation. Identity forward;
    each rank's gradient only covers its shard's use, so the gradients are summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return WAIT(ALL_REDUCE(grad.contiguous(), "sum", ctx.group_name)), None


class _SumOverReplicas(torch.autograd.Function):
    """A parameter slice some of whose elements other ranks hold too (GQA kv heads when kv_heads
    < world size, chunks kept whole on every rank): each rank's gradient covers only its own use,
    so every element's gradient is summed over the ranks holding it. One all-reduce over the
    whole group of the full-size gradient, each rank writing its elements at their global
    positions (zeros elsewhere), sums within the holders without creating sub-groups."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str, dim: int, ranges: tuple,
                full_size: int) -> torch.Tensor:
        ctx.meta = (group_name, dim, ranges, full_size)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group_name, dim, ranges, full_size = ctx.meta
        pieces, at, offset = [], 0, 0
        for start, length in ranges:
            if start > at:
                pieces.append(grad.new_zeros((*grad.shape[:dim], start - at, *grad.shape[dim + 1:])))
            pieces.append(grad.narrow(dim, offset, length))
            at, offset = start + length, offset + length
        if full_size > at:
            pieces.append(grad.new_zeros((*grad.shape[:dim], full_size - at, *grad.shape[dim + 1:])))
        summed = WAIT(ALL_REDUCE(torch.cat(pieces, dim).contiguous(), "sum", group_name))
        local = torch.cat([summed.narrow(dim, start, length) for start, length in ranges], dim)
        return local, None, None, None, None


class _GatherDim0(torch.autograd.Function):
    """All-gathers rank-ordered shards along dim 0; the gradient of a shard is its slice of the
    (identical on every rank) gradient of the gathered tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int, group_name: str, rank: int) -> torch.Tensor:
        ctx.meta = (x.shape[0], rank)
        return WAIT(ALL_GATHER(x, world_size, group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, rank = ctx.meta
        return grad.narrow(0, rank * n, n), None, None, None


class _GradOnlyAdd(torch.autograd.Function):
    """A constant added to a partial sum is added by rank 0 only; on the other ranks this
    returns the partial sum unchanged but still gives the constant its (full) gradient, which
    every rank can compute locally because a partial sum's gradient is the whole sum's."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        ctx.const_shape = const.shape
        return partial.view_as(partial)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.sum_to_size(ctx.const_shape)


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a gradient can flow through this call. Without one (inference, `no_grad`) the
    collectives skip `autograd.Function.apply`, whose bookkeeping costs eager inference as much
    as the latency of a small all-reduce; the forward computed is the same either way, so traced
    and compiled graphs are unchanged."""
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron's g: all-reduce forward, identity backward (after a row-parallel region)."""
    if not _needs_autograd(x):
        return WAIT(ALL_REDUCE(x, "sum", group_name))
    return _AllReduceSum.apply(x, group_name)


def copy_to_region(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce backward (before a column-parallel region)."""
    if not _needs_autograd(x):
        return x
    return _CopyToRegion.apply(x, group_name)


def sum_over_replicas(x: torch.Tensor, group_name: str, dim: int, ranges: tuple,
                      full_size: int) -> torch.Tensor:
    """Identity forward; backward sums each element's gradient over the ranks holding it.
    `ranges`: the (global start, length) runs along `dim` this rank holds, in order."""
    if not _needs_autograd(x):
        return x
    return _SumOverReplicas.apply(x, group_name, dim, ranges, full_size)


def all_gather_dim0(x: torch.Tensor, world_size: int, group_name: str, rank: int) -> torch.Tensor:
    """All-gather along dim 0 forward, this rank's slice backward (vocab-parallel logits)."""
    if not _needs_autograd(x):
        return WAIT(ALL_GATHER(x, world_size, group_name))
    return _GatherDim0.apply(x, world_size, group_name, rank)


def grad_only_add(partial: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """`partial` forward; backward also gives `const` the gradient of `partial + const`."""
    if not _needs_autograd(partial, const):
        return partial
    return _GradOnlyAdd.apply(partial, const)


GRAD_SYNC_OPS = (copy_to_region, sum_over_replicas)
