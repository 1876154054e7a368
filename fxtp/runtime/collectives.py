"""The collectives the rewritten graph calls, with their autograd duals.

The graph calls `torch.ops._c10d_functional.all_reduce` + `wait_tensor` by group name: functional
collectives are traceable, so the rewritten graph composes with torch.compile, and the group is
resolved by name at run time rather than captured as a Python object.
"""
from __future__ import annotations

import torch

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default


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


class _SumGradsOverRanks(torch.autograd.Function):
    """f for several parameters at once (the norms' weights that sequence parallelism applies
    to each rank's tokens): identity forward; backward, once every gradient is in (at the end
    of backward), one all-reduce of them all, as Megatron sums its layer-norm gradients."""

    @staticmethod
    def forward(ctx, group_name: str, *xs: torch.Tensor):
        ctx.group_name = group_name
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        summed: list = list(grads)
        by_dtype: dict = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = WAIT(ALL_REDUCE(torch.cat([grads[i].reshape(-1) for i in idx]), "sum",
                                   ctx.group_name))
            at = 0
            for i in idx:
                n = grads[i].numel()
                summed[i] = flat[at:at + n].view_as(grads[i])
                at += n
        return (None, *summed)


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


def sum_grads_over_ranks(group_name: str, *xs: torch.Tensor) -> tuple:
    """`xs` forward; backward, their gradients summed over the ranks in one all-reduce."""
    if not _needs_autograd(*xs):
        return xs
    return _SumGradsOverRanks.apply(group_name, *xs)


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


GRAD_SYNC_OPS = (copy_to_region, sum_over_replicas, sum_grads_over_ranks)
