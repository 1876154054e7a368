"""Sequence parallelism's collectives (Megatron-SP): values split along the sequence dim.

Rank r holds tokens [start(r), start(r) + length(r)) of a sequence of s tokens, the first
s % N ranks one token more than the others (`torch.tensor_split`'s split). The lengths are
computed from s at run time (`local_length`), so batch and sequence stay dynamic and s need
not divide by N. The collectives work on dim 0 of equal blocks, as NCCL's and gloo's
`reduce_scatter_tensor` / `all_gather_into_tensor` do: the tokens are laid out as
[N, ..., ceil(s / N), ...], rank r's block at index r (one copy each way unless the sequence
is the first dim), and when s does not divide, every rank's piece is padded to ceil(s / N)
tokens (zeros, so the sums are unchanged) and cut back after. Padding costs at most N - 1 tokens of traffic; no
rank ever computes on a padded token.

    reduce_scatter_seq   partial [.., s, ..] -> this rank's tokens of the sum   (backward: gather)
    all_gather_seq       tokens  [.., c, ..] -> [.., s, ..] on every rank   (backward: reduce-scatter,
                                                                             or the rank's slice)
    scatter_seq          replicated [.., s, ..] -> this rank's tokens        (backward: gather)
    rank0_grad           identity; backward keeps the gradient on rank 0 only

Each is a function an FX node can call, around an `autograd.Function` made of functional
collectives (traceable by dynamo); without gradients the forward runs directly.
"""
from __future__ import annotations

import torch

from .collectives import ALL_GATHER, WAIT
from .regather import note_gathered

REDUCE_SCATTER = torch.ops._c10d_functional.reduce_scatter_tensor.default


def local_length(s, world_size: int, rank: int):
    """Tokens rank `rank` holds of `s` (int or SymInt): ceil for the first s % N ranks. Written
    without a branch, so a symbolic s stays symbolic."""
    return (s + world_size - 1 - rank) // world_size


def local_start(s, world_size: int, rank: int):
    """Index of rank `rank`'s first token."""
    start = 0
    for r in range(rank):
        start = start + local_length(s, world_size, r)
    return start


def _blocks(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """`x` as [N, ..., ceil(s / N), ...]: rank r's tokens (zero-padded to one block) at index r,
    contiguous (one copy; none when the sequence is the first dim and divides)."""
    s = x.shape[dim]
    block = local_length(s, world_size, 0)
    if block * world_size == s:
        return x.unflatten(dim, (world_size, block)).movedim(dim, 0).contiguous()
    out = x.new_zeros((world_size, *x.shape[:dim], block, *x.shape[dim + 1:]))
    for r in range(world_size):
        start, length = local_start(s, world_size, r), local_length(s, world_size, r)
        out[r].narrow(dim, 0, length).copy_(x.narrow(dim, start, length))
    return out


def _reduce_scatter(x: torch.Tensor, dim: int, world_size: int, rank: int,
                    group_name: str) -> torch.Tensor:
    s = x.shape[dim]
    blocks = _blocks(x, dim, world_size)
    summed = WAIT(REDUCE_SCATTER(blocks.flatten(0, 1) if blocks.dim() > 1 else blocks, "sum",
                                 world_size, group_name)).view(blocks.shape[1:])
    length = local_length(s, world_size, rank)
    return summed if length == summed.shape[dim] else summed.narrow(dim, 0, length)


def _all_gather(x: torch.Tensor, dim: int, world_size: int, rank: int, group_name: str,
                s) -> torch.Tensor:
    block = local_length(s, world_size, 0)
    if x.shape[dim] != block:
        pad = list(x.shape)
        pad[dim] = block - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    gathered = WAIT(ALL_GATHER(x.contiguous().unsqueeze(0), world_size, group_name))
    if block * world_size != s:    # [N, ..., block, ...]: each rank's tokens, unpadded
        return torch.cat([gathered[r].narrow(dim, 0, local_length(s, world_size, r))
                          for r in range(world_size)], dim)
    return gathered.movedim(0, dim).flatten(dim, dim + 1).contiguous()


def _slice(x: torch.Tensor, dim: int, world_size: int, rank: int) -> torch.Tensor:
    """This rank's tokens, copied: a view would keep the whole of `x` alive in whatever saves
    it for backward."""
    s = x.shape[dim]
    piece = x.narrow(dim, local_start(s, world_size, rank), local_length(s, world_size, rank))
    return piece.clone(memory_format=torch.contiguous_format)


class _ReduceScatterSeq(torch.autograd.Function):
    """Megatron-SP's g-bar: sums a partial value over the ranks, each keeping its tokens. The
    gradient of every summand is the whole sum's: the tokens' gradients gathered."""

    @staticmethod
    def forward(ctx, x, dim, world_size, rank, group_name):
        ctx.meta = (dim, world_size, rank, group_name, x.shape[dim])
        return _reduce_scatter(x, dim, world_size, rank, group_name)

    @staticmethod
    def backward(ctx, grad):
        dim, world_size, rank, group_name, s = ctx.meta
        return _all_gather(grad, dim, world_size, rank, group_name, s), None, None, None, None


class _AllGatherSeq(torch.autograd.Function):
    """Megatron-SP's g: every rank gets the whole sequence. `grad="sum"`: the readers compute
    sharded results, so each rank's gradient of the whole is partial; it is summed over the
    ranks and each keeps its tokens' (a reduce-scatter). `grad="slice"`: the readers are
    replicated, their gradient is the same on every rank; each keeps its tokens'."""

    @staticmethod
    def forward(ctx, x, dim, world_size, rank, group_name, s, grad):
        ctx.meta = (dim, world_size, rank, group_name, grad)
        return _all_gather(x, dim, world_size, rank, group_name, s)

    @staticmethod
    def backward(ctx, g):
        dim, world_size, rank, group_name, grad = ctx.meta
        out = (_reduce_scatter(g, dim, world_size, rank, group_name) if grad == "sum"
               else _slice(g, dim, world_size, rank))
        return out, None, None, None, None, None, None


class _ScatterSeq(torch.autograd.Function):
    """A replicated value entering the sequence-sharded region: each rank keeps its tokens.
    Each rank's gradient covers its tokens only: they are gathered."""

    @staticmethod
    def forward(ctx, x, dim, world_size, rank, group_name):
        ctx.meta = (dim, world_size, rank, group_name, x.shape[dim])
        return _slice(x, dim, world_size, rank)

    @staticmethod
    def backward(ctx, grad):
        dim, world_size, rank, group_name, s = ctx.meta
        return (_all_gather(grad.contiguous(), dim, world_size, rank, group_name, s),
                None, None, None, None)


class _Rank0Grad(torch.autograd.Function):
    """Identity; the gradient is kept on rank 0 and zero elsewhere, so that a reduce-scatter of
    gradients counts once a gradient that every rank computed alike."""

    @staticmethod
    def forward(ctx, x, rank):
        ctx.rank = rank
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.rank == 0 else torch.zeros_like(grad)), None


def _needs_autograd(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def reduce_scatter_seq(x: torch.Tensor, dim: int, world_size: int, rank: int,
                       group_name: str) -> torch.Tensor:
    """This rank's tokens of the sum over ranks of the partial `x` (sequence on `dim`)."""
    if not _needs_autograd(x):
        return _reduce_scatter(x, dim, world_size, rank, group_name)
    return _ReduceScatterSeq.apply(x, dim, world_size, rank, group_name)


def all_gather_seq(x: torch.Tensor, dim: int, world_size: int, rank: int, group_name: str,
                   s, grad: str = "sum") -> torch.Tensor:
    """The whole sequence (`s` tokens on `dim`) from every rank's tokens `x`; `grad` is "sum"
    for readers with sharded results, "slice" for replicated readers."""
    if not _needs_autograd(x):
        return _all_gather(x, dim, world_size, rank, group_name, s)
    out = _AllGatherSeq.apply(x, dim, world_size, rank, group_name, s, grad)
    # its readers save `out` for backward: regather.py keeps `x` instead, and gathers again
    note_gathered(x, out, lambda shard: _all_gather(shard, dim, world_size, rank, group_name, s))
    return out


def scatter_seq(x: torch.Tensor, dim: int, world_size: int, rank: int,
                group_name: str) -> torch.Tensor:
    """This rank's tokens of the replicated `x` (a copy, no communication forward)."""
    if not _needs_autograd(x):
        return _slice(x, dim, world_size, rank)
    return _ScatterSeq.apply(x, dim, world_size, rank, group_name)


def rank0_grad(x: torch.Tensor, rank: int) -> torch.Tensor:
    """`x`; backward, the gradient on rank 0 and zeros on the other ranks."""
    if not _needs_autograd(x):
        return x
    return _Rank0Grad.apply(x, rank)


SEQUENCE_COLLECTIVES = (reduce_scatter_seq, all_gather_seq, scatter_seq)
