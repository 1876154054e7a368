"""Rules for ops that take parts of a sharded dim or join parts into one: select and index (a
few elements), slice and split (ranges, which must fall on chunk boundaries or the source is
re-cut), cat (pieces joined as chunks).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from ..graph.ops import IDENTITY, SPLITS, aten, functional_twin
from .align import align
from .placements import DimShard, Sharded
from .records import IntArg
from .registry import SHARDED_RULES, RuleContext, RuleFailure
from .shapes import node_shape, norm_dim, per_rank, sharded_or_replicate
from .splits import boundaries, chunk_of, recut, whole_chunks

rule = SHARDED_RULES.rule


# -- a few elements -------------------------------------------------------------------------------
@rule(aten.select.int)
def select(ctx: RuleContext, n: fx.Node) -> Any:
    x, sp, src = ctx.sharded_input(n)
    dim = norm_dim(n.args[1], len(src))
    if sp.get(dim) is not None:
        _pick(ctx, sp, dim, [n.args[2]])
    shift = lambda d: d - 1 if d > dim else d
    return sharded_or_replicate({shift(d): s for d, s in sp.dims if d != dim},
                                {shift(d): o for d, o in sp.origin_dict().items() if d != dim})


@rule(aten.index.Tensor)
def index(ctx: RuleContext, n: fx.Node) -> Any:
    """x[..., idx, ...] with one index tensor; on a sharded dim only constant indices into
    chunks that every rank holds whole (the k and v heads of a fused multi-query qkv)."""
    x, sp, src = ctx.sharded_input(n)
    indices = list(n.args[1])
    used = [k for k, i in enumerate(indices) if i is not None]
    if len(used) != 1 or isinstance(ctx.placement(indices[used[0]]), Sharded):
        raise RuleFailure("advanced indexing of a sharded tensor")
    k = used[0]
    if sp.get(k) is not None:
        values = _constant_ints(ctx.gm, indices[k])
        if values is None:
            raise RuleFailure("indexes a sharded dim with indices computed at run time")
        _pick(ctx, sp, k, values)
    extra = len(node_shape(indices[k]) or []) - 1
    shift = lambda d: d + extra if d > k else d
    return sharded_or_replicate({shift(d): s for d, s in sp.dims if d != k},
                                {shift(d): o for d, o in sp.origin_dict().items() if d != k})


def _constant_ints(gm: fx.GraphModule, node: Any) -> Optional[list[int]]:
    """The values of a constant index tensor (a lifted constant, maybe copied)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and \
            functional_twin(node.target) in IDENTITY:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or value.dim() > 1 or value.is_floating_point():
        return None
    return [int(v) for v in value.reshape(-1).tolist()]


def _pick(ctx: RuleContext, sp: Sharded, dim: int, picks: list) -> None:
    """Elements picked from a sharded dim: they must lie in chunks every rank holds whole,
    at the same local position on every rank; else ask for those elements as whole chunks."""
    ds = sp.get(dim)
    if ds.outer or not all(isinstance(i, int) for i in picks):
        raise RuleFailure("picks elements of a sharded dim")
    size, bounds = ds.size, boundaries(ds)
    glob = [i + size if i < 0 else i for i in picks]
    whole = all(ds.splits[chunk_of(bounds, g)].parts == 1 for g in glob)
    if not whole:
        def make(cur: DimShard, unit: int) -> Optional[DimShard]:
            if cur.size != ds.size * unit:   # the source viewed otherwise: offsets unknown
                return None
            return whole_chunks(cur, [(g * unit, (g + 1) * unit) for g in glob])
        ctx.refine_or_fail(sp, dim, make)
        raise RuleFailure("picks elements of a sharded dim")
    for r in range(ctx.world_size):
        layout = ds.index(r).tolist()
        for i, g in zip(picks, glob):
            local = layout.index(g)
            if (local if i >= 0 else local - len(layout)) != i:
                raise RuleFailure(f"index {i} of a sharded dim would need a different constant "
                                  f"on rank {r}")


# -- ranges ---------------------------------------------------------------------------------------
def _cut(ctx: RuleContext, sp: Sharded, dim: int, cuts: list[int]) -> list[DimShard]:
    """Splits a sharded dim at global offsets `cuts`; each piece must be whole chunks."""
    ds = sp.get(dim)
    if ds.outer:
        raise RuleFailure("cuts a dim holding a sharded block")
    bounds = boundaries(ds)
    if all(c in bounds for c in cuts):
        pieces = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            i, j = bounds.index(a), bounds.index(b)
            pieces.append(ds.with_splits(ds.splits[i:j]))
        return pieces

    def make(cur: DimShard, unit: int) -> Optional[DimShard]:
        if cur.size != ds.size * unit:   # the source viewed otherwise: offsets unknown
            return None
        return recut(cur, [c * unit for c in cuts])
    ctx.refine_or_fail(sp, dim, make)
    raise RuleFailure(f"cuts a sharded dim at {cuts}, not at the boundaries of its shards")


@rule(aten.slice.Tensor)
def slice_(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    dim = norm_dim(n.args[1] if len(n.args) > 1 else 0, len(src))
    ds = sp.get(dim)
    if ds is None:
        return sp
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    if not isinstance(start, (int, type(None))) or not isinstance(end, (int, type(None))):
        raise RuleFailure("dynamic slice of a sharded dim")
    size = ds.size
    if step != 1:
        return _strided(ctx, n, sp, dim, start or 0, end, step)
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    piece, = _cut(ctx, sp, dim, [start, end])
    ws = ctx.world_size
    first = boundaries(ds).index(start)
    lstart = [sum(c.range(r)[1] for c in ds.splits[:first]) for r in range(ws)]
    lend = [a + b for a, b in zip(lstart, piece.local_sizes(ws))]
    ctx.actions.int_args.append(IntArg(n.name, (2,), per_rank(lstart)))
    ctx.actions.int_args.append(IntArg(n.name, (3,), per_rank(lend)))
    dims = sp.as_dict()
    dims[dim] = piece
    return Sharded.of(dims, sp.piece_origin(dim, start))


def _strided(ctx: RuleContext, n: fx.Node, sp: Sharded, dim: int, start: int,
             end: Optional[int], step: int) -> Sharded:
    """x[..., start::step] of a sharded dim (gate and up interleaved, `h[..., ::2]` and
    `h[..., 1::2]`): when every rank's piece starts on a multiple of `step`, each rank takes
    the same slice of its piece and holds every step-th element of what it held."""
    ds = sp.get(dim)
    whole = end is None or end >= ds.size
    picked = ds.scaled(1, step)
    if ds.outer or not 0 <= start < step or not whole or picked is None or any(
            s % step or n_ % step for r in range(ctx.world_size)
            for s, n_ in ds.local_ranges(r)):
        raise RuleFailure(f"slices a sharded dim with step {step} across its shards")
    if end is not None and end < 2 ** 62:
        ctx.actions.int_args.append(
            IntArg(n.name, (3,), per_rank(list(ds.local_sizes(ctx.world_size)))))
    dims = sp.as_dict()
    dims[dim] = picked
    return Sharded.of(dims, {d: o for d, o in sp.origin_dict().items() if d != dim})


def _split_input(ctx: RuleContext, n: fx.Node) -> tuple[Sharded, int, Any]:
    """The placement a split / tensor_split reads, the dim it cuts (argument 2) and the
    pieces' values."""
    x, sp, src = ctx.sharded_input(n)
    dim = norm_dim(n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0), len(src))
    return sp, dim, n.meta.get("val")


@rule(*SPLITS)
def split(ctx: RuleContext, n: fx.Node) -> list:
    sp, dim, outs = _split_input(ctx, n)
    if sp.get(dim) is None:
        return [sp for _ in outs]
    cuts = _cuts_of(outs, dim)
    pieces = _cut(ctx, sp, dim, cuts)
    per_rank_sizes = [[p.local_size_of(r) for p in pieces] for r in range(ctx.world_size)]
    if n.target == aten.split_with_sizes.default:
        for i in range(len(pieces)):
            ctx.actions.int_args.append(
                IntArg(n.name, (1, i), per_rank([loc[i] for loc in per_rank_sizes])))
    elif n.target in (aten.split.Tensor, aten.chunk.default):
        for loc in per_rank_sizes:
            if any(v != loc[0] for v in loc[:-1]) or loc[-1] > loc[0] or \
                    (n.target == aten.chunk.default and loc[-1] != loc[0]):
                raise RuleFailure("split pieces would have unequal local sizes")
        if n.target == aten.split.Tensor:
            ctx.actions.int_args.append(
                IntArg(n.name, (1,), per_rank([loc[0] for loc in per_rank_sizes])))
    # chunk(n) keeps its count: equal local pieces on every rank
    return [_piece(sp, dim, p, start) for p, start in zip(pieces, cuts)]


@rule(aten.tensor_split.indices, aten.tensor_split.sections)
def tensor_split(ctx: RuleContext, n: fx.Node) -> list:
    """x.tensor_split(indices, dim): along a dim every rank holds whole, each piece keeps x's
    placement (Bamba's scan cuts the sequence at a length known at run time); along a sharded
    dim, constant indices on the boundaries of its shards, rewritten to each rank's offsets."""
    sp, dim, outs = _split_input(ctx, n)
    if sp.get(dim) is None:
        return [sp for _ in outs]
    if n.target != aten.tensor_split.indices or not all(isinstance(i, int) for i in n.args[1]):
        raise RuleFailure("tensor_split of a sharded dim into a count of pieces or at indices "
                          "computed at run time")
    cuts = _cuts_of(outs, dim)
    pieces = _cut(ctx, sp, dim, cuts)
    for i in range(len(pieces) - 1):
        ctx.actions.int_args.append(IntArg(n.name, (1, i), per_rank(
            [sum(p.local_size_of(r) for p in pieces[:i + 1]) for r in range(ctx.world_size)])))
    return [_piece(sp, dim, p, start) for p, start in zip(pieces, cuts)]


def _cuts_of(outs: Any, dim: int) -> list[int]:
    """The offsets along `dim` where the pieces a split returned start, and the end."""
    cuts = [0]
    for o in outs:
        cuts.append(cuts[-1] + int(o.shape[dim]))
    return cuts


def _piece(sp: Sharded, dim: int, piece: DimShard, start: int) -> Any:
    """The placement of a piece cut from `dim`: one element every rank holds whole (the one k
    head of a fused multi-query qkv viewed as heads) is replicated along `dim`, as the index
    `x[..., [i], :]` picking it is. Wider whole pieces keep their place in the source's split
    (MLA's shared rope key, which the latent beside it follows)."""
    dims, origin = sp.as_dict(), sp.piece_origin(dim, start)
    if piece.size == 1 and all(c.parts == 1 for c in piece.splits):
        del dims[dim]
        return sharded_or_replicate(dims, origin)
    dims[dim] = piece
    return Sharded.of(dims, origin)


@rule(aten.pad.default, aten.constant_pad_nd.default)
def pad(ctx: RuleContext, n: fx.Node) -> Sharded:
    """Padding (pairs from the last dim backwards) of dims that are whole on every rank."""
    x, sp, src = ctx.sharded_input(n)
    amounts = list(n.args[1])
    padded = {len(src) - 1 - i // 2 for i, a in enumerate(amounts) if not isinstance(a, int) or a}
    if any(d in padded for d, _ in sp.dims):
        raise RuleFailure("pads a sharded dim")
    return sp


# -- pieces joined --------------------------------------------------------------------------------
@rule(aten.cat.default)
def cat(ctx: RuleContext, n: fx.Node) -> Sharded:
    tensors = n.args[0]
    out = node_shape(n)
    dim = norm_dim(n.args[1] if len(n.args) > 1 else 0, len(out))
    specs = [ctx.placement(t) for t in tensors]
    if all(isinstance(s, Sharded) and s.get(dim) for s in specs):
        if any(s.get(dim).outer for s in specs):
            raise RuleFailure("concatenates dims holding sharded blocks")
        rest = [tuple((d, v) for d, v in s.dims if d != dim) for s in specs]
        if any(r != rest[0] for r in rest):
            raise RuleFailure("concatenates differently sharded pieces")
        dims = dict(rest[0])
        dims[dim] = DimShard(splits=tuple(c for s in specs for c in s.get(dim).splits))
        return Sharded.of(dims)
    return align(ctx, n, [(0, i) for i in range(len(tensors))], out, forbid=[dim])
