"""Rules for ops that move a sharded dim without touching its data: views and reshapes (which
may regroup it into heads and need their size constants rewritten), transposes, (un)squeeze,
expand, identity ops, and the metadata ops around them (sym_size, getitem, asserts).
"""
from __future__ import annotations

import operator
from fractions import Fraction
from typing import Any, Optional

from torch import fx

from ..graph.ops import (
    DROPOUT,
    DTYPE_OF,
    IDENTITY,
    LIKE,
    NO_OUTPUT,
    TRANSPOSES,
    VIEWS,
    aten,
    dropout_active,
)
from .align import align
from .placements import REPLICATE, DimShard, Origin, Sharded, group_dims
from .records import IntArg, Narrow, ReasonKind, SymSize
from .registry import DECLINED, SHARDED_RULES, RuleContext, RuleFailure
from .shapes import node_shape, norm_dim, per_rank, static_int, static_prod
from .splits import split_in_heads, why_not_whole_heads

rule = SHARDED_RULES.rule


# -- metadata -----------------------------------------------------------------------------------
@rule(*NO_OUTPUT)
def no_output(ctx: RuleContext, n: fx.Node) -> Any:
    return REPLICATE


@rule(aten.sym_size.int)
def sym_size(ctx: RuleContext, n: fx.Node) -> Any:
    x0 = n.args[0]
    sp = ctx.placement(x0)
    if isinstance(sp, Sharded) and sp.get(norm_dim(n.args[1], len(node_shape(x0)))):
        raise RuleFailure("reads the size of a sharded dim")
    return REPLICATE


@rule(operator.getitem)
def getitem(ctx: RuleContext, n: fx.Node) -> Any:
    parent = ctx.placement(n.args[0])
    if isinstance(parent, (list, tuple)):
        return parent[n.args[1]]
    raise RuleFailure("getitem on a sharded tensor")


@rule(*IDENTITY)
def identity(ctx: RuleContext, n: fx.Node) -> Any:
    if n.target in DTYPE_OF:       # x.type_as(other): other gives its dtype only
        return ctx.placement(n.args[0])
    if len(n.all_input_nodes) == 1:
        return ctx.sharded(n.args[0] if n.args else None)
    return DECLINED


@rule(*LIKE)
def like(ctx: RuleContext, n: fx.Node) -> Any:
    """zeros_like(x) and kin: a new tensor of x's local shape, so of x's placement."""
    return ctx.sharded(n.args[0])


@rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
      aten.new_full.default)
def new_like(ctx: RuleContext, n: fx.Node) -> Any:
    """x.new_empty(size) and kin: a fresh tensor that takes only x's dtype and device. When
    `size` repeats x's size on every sharded dim (HY-V4's `key_states = kv.new_empty(*kv.shape)`
    over heads) it is made with x's placement, its sharded sizes the local ones; otherwise it
    is a replicated tensor of its own size."""
    x, sp, src = ctx.sharded_input(n)
    size = n.args[1]
    if not isinstance(size, (list, tuple)) or len(size) != len(src) or any(
            static_int(size[d]) is None or static_int(size[d]) != static_int(src[d])
            for d, _ in sp.dims):
        return REPLICATE
    for d, ds in sp.dims:
        rewrite_size(ctx, n, 1, d, ds)
    return sp


@rule(*DROPOUT)
def inactive_dropout(ctx: RuleContext, n: fx.Node) -> Any:
    return DECLINED if dropout_active(n) else identity(ctx, n)


# -- views ----------------------------------------------------------------------------------------
@rule(*VIEWS)
def view(ctx: RuleContext, n: fx.Node) -> Sharded:
    return view_placement(ctx, n, size_arg=1)


@rule(aten.flatten.using_ints, aten.unflatten.int)
def flatten(ctx: RuleContext, n: fx.Node) -> Sharded:
    return view_placement(ctx, n, size_arg=None)


@rule(aten.view_as.default, aten.reshape_as.default)
def view_as(ctx: RuleContext, n: fx.Node) -> Sharded:
    """x.view_as(other): the view's local shape is other's, so other must be sharded as the
    view of x would be."""
    out = view_placement(ctx, n, size_arg=None)
    if ctx.placement(n.args[1]) != out:
        raise RuleFailure("views a sharded value as the shape of a value sharded otherwise")
    return out


@rule(aten.view_as_complex.default)
def view_as_complex(ctx: RuleContext, n: fx.Node) -> Sharded:
    """[..., 2] real pairs -> [...] complex (rotary written with complex numbers)."""
    x, sp, src = ctx.sharded_input(n)
    if sp.get(len(src) - 1) is not None:
        raise RuleFailure("views the sharded dim of (real, imaginary) pairs as complex")
    return sp


@rule(aten.view_as_real.default)
def view_as_real(ctx: RuleContext, n: fx.Node) -> Sharded:
    """[...] complex -> [..., 2]: the sharded dims stay where they are."""
    return ctx.sharded(n.args[0])


def view_placement(ctx: RuleContext, n: fx.Node, size_arg: Optional[int]) -> Sharded:
    """A view/reshape (sizes in argument `size_arg`, rewritten to local sizes) or a flatten /
    unflatten (no size argument to rewrite)."""
    x, sp, src = ctx.sharded_input(n)
    dst = node_shape(n)
    groups = group_dims(src, dst)
    if groups is None:
        raise RuleFailure(f"cannot relate view shapes {src} -> {dst}")
    dims: dict[int, DimShard] = {}
    origin: dict[int, Origin] = {}
    for gi, go in groups:
        sh = [(d, sp.get(d)) for d in gi if sp.get(d) is not None]
        if not sh:
            continue
        if len(sh) > 1:
            raise RuleFailure("merges two sharded dims")
        d, ds = sh[0]
        if ds.outer:
            j, new, unit = _view_outer(d, ds, gi, go, src, dst)
        else:
            j, new, unit = _view_inner(ctx, sp, d, ds, gi, go, src, dst, groups)
        dims[j] = new
        if unit is not None:
            origin[j] = sp.origin_of(d)._replace(unit=unit)
        if size_arg is not None:
            rewrite_size(ctx, n, size_arg, j, new)
        elif n.target == aten.unflatten.int and \
                new.local_sizes(ctx.world_size) != (new.size,) * ctx.world_size:
            raise RuleFailure("unflattens a sharded dim (its sizes are not rewritten yet)")
    return Sharded.of(dims, origin)


def _view_inner(ctx: RuleContext, sp: Sharded, d: int, ds: DimShard, gi: list, go: list,
                src: list, dst: list, groups: list) -> tuple[int, DimShard, Optional[int]]:
    """A view regrouping a sharded dim with static inner dims (heads <-> features), or
    merging it with outer dims (then the result is an `outer` dim)."""
    outer = any(static_int(src[k]) != 1 for k in gi if k < d)
    inner_in = static_prod([src[k] for k in gi if k > d])
    if inner_in is None:
        raise RuleFailure("merges a sharded dim with a dynamic dim")
    flat = ds.scaled(inner_in)
    outs = [j for j in go if static_int(dst[j]) != 1]
    if not outs:
        raise RuleFailure("views a sharded dim as size 1")
    if outer:
        # the outer dims and the sharded one as one dim (whole units of it: heads), static
        # dims after it the rest of each unit (`gate.reshape(-1, head_dim)`: a row per head)
        inner_out = static_prod([dst[k] for k in go if k > outs[0]])
        new = flat.scaled(1, inner_out) if flat is not None and inner_out else None
        if new is None or not new.valid():
            raise RuleFailure("merges a sharded dim into an outer dim and splits it again")
        return outs[0], new.with_splits(new.splits, outer=True), None
    j = outs[0]
    new_unit_dim = j != go[0] or ([], [j - 1]) in groups
    if new_unit_dim and static_int(dst[j - 1]) == 1 and ctx.whole_source(sp, d):
        ctx.single_head.add(sp.origin_of(d).source)
    inner_out = static_prod([dst[k] for k in go if k > j])
    if inner_out is None:
        raise RuleFailure("splits a sharded dim into a dynamic dim")
    new = flat.scaled(1, inner_out) if flat is not None else None
    org = sp.origin_of(d)
    unit = None
    if org is not None:
        u = Fraction(org.unit, inner_in) * inner_out
        unit = int(u) if u.denominator == 1 else None
    if (new is None or not new.valid()) and flat is not None:
        moved = _chunks_as_dim(flat, dst, go, j)
        if moved is not None:
            return moved
    if new is None or not new.valid():
        heads = static_int(dst[j])
        # whole heads: split the source at head boundaries (unevenly if the count does not
        # divide); fewer heads than ranks: groups of ranks hold the same heads (kv heads,
        # as vLLM does), or every rank all of them when no group size fits
        if unit is not None:
            alone = ctx.whole_source(sp, d)
            ctx.refine_or_fail(sp, d, lambda cur, _u: split_in_heads(cur, unit, alone))
        raise RuleFailure(why_not_whole_heads(
            *((flat, inner_out) if flat is not None else (ds, 1)), heads),
                          ReasonKind.NOT_DIVISIBLE)
    return j, new, unit


def _chunks_as_dim(flat: DimShard, dst: list, go: list,
                   j: int) -> Optional[tuple[int, DimShard, None]]:
    """k equal chunks split alike, viewed as [k, *chunk dims] (`qkv.view(b, s, 3, h, d)`):
    the chunk dim is whole on every rank and the split moves into the chunk's own dims."""
    k = static_int(dst[j])
    if k is None or k < 2 or len(flat.splits) != k or len(set(flat.splits)) != 1:
        return None
    rest = [i for i in go if i > j and static_int(dst[i]) != 1]
    if not rest:
        return None
    inner = static_prod([dst[i] for i in go if i > rest[0]])
    one = flat.with_splits(flat.splits[:1]).scaled(1, inner) if inner else None
    if one is None or not one.valid():
        return None
    return rest[0], one, None


def _view_outer(d: int, ds: DimShard, gi: list, go: list, src: list,
                dst: list) -> tuple[int, DimShard, Optional[int]]:
    """A view of a dim that is (dynamic outer) x (sharded block), with static dims after it
    joining the block: kept merged, or split back into the outer dims and the block (BLOOM's
    `[b * heads, s, d] -> [b, heads, s, d]`; a gated delta rule's per-head rows put back,
    `[b * s * heads, d] -> [b, s, heads * d]`)."""
    if gi[0] != d:
        raise RuleFailure("merges a dim holding a sharded block with the dims before it")
    inner_in = static_prod([src[k] for k in gi[1:]])
    flat = ds.scaled(inner_in) if inner_in else None
    if flat is None or not flat.valid():
        raise RuleFailure("merges a dim holding a sharded block with other dims")
    if len(go) == 1:
        return go[0], flat, None
    for t in range(1, len(go)):
        tail = static_prod([dst[k] for k in go[t:]])
        if tail == flat.size:
            j = go[t]
            inner_out = static_prod([dst[k] for k in go[t + 1:]])
            new = flat.with_splits(flat.splits, outer=False).scaled(1, inner_out)
            if new is None or not new.valid():
                break
            return j, new, None
    raise RuleFailure("splits a dim holding a sharded block, not at the block's boundary")


def rewrite_size(ctx: RuleContext, n: fx.Node, arg: int, pos: int, spec: DimShard) -> None:
    """Records the rewrite of the size at `n.args[arg][pos]` to the local size of `spec`."""
    sizes = n.args[arg]
    if not isinstance(sizes, (list, tuple)) or pos >= len(sizes):
        raise RuleFailure("size argument not a list")
    v = sizes[pos]
    local = spec.local_sizes(ctx.world_size)
    if isinstance(v, int):
        if v == -1 or all(v == x for x in local):
            return
        if spec.outer and v % spec.size == 0:
            ctx.actions.int_args.append(
                IntArg(n.name, (arg, pos), per_rank([v // spec.size * x for x in local])))
            return
        if v != spec.size:
            raise RuleFailure(f"size constant {v} does not match the sharded dim of {spec.size}")
        ctx.actions.int_args.append(IntArg(n.name, (arg, pos), per_rank(local)))
        return
    if spec.outer and isinstance(v, fx.Node):
        # (outer x block) computed at run time (b * heads): scaled to the local block
        ctx.actions.sym_sizes.append(SymSize(n.name, (arg, pos), spec.size, per_rank(local)))
        return
    raise RuleFailure("a sharded dim's size is computed at run time")


# -- dims moved, added or removed -----------------------------------------------------------------
@rule(*TRANSPOSES)
def permute(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    r = len(src)
    if n.target == aten.transpose.int:
        a, b = norm_dim(n.args[1], r), norm_dim(n.args[2], r)
        perm = list(range(r))
        perm[a], perm[b] = perm[b], perm[a]
    elif n.target == aten.permute.default:
        perm = [norm_dim(d, r) for d in n.args[1]]
    else:
        perm = list(reversed(range(r)))
    inv = {old: new for new, old in enumerate(perm)}
    return Sharded.of({inv[d]: s for d, s in sp.dims},
                      {inv[d]: o for d, o in sp.origin_dict().items()})


@rule(aten.unsqueeze.default)
def unsqueeze(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    d0 = norm_dim(n.args[1], len(src) + 1)
    return sp.moved(lambda d: d + 1 if d >= d0 else d)


@rule(aten.squeeze.dim, aten.squeeze.dims)
def squeeze(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    gone = {norm_dim(d, len(src)) for d in dims if static_int(src[norm_dim(d, len(src))]) == 1}
    if any(d in gone for d, _ in sp.dims):
        raise RuleFailure("squeezes a sharded dim")
    return sp.moved(lambda d: d - sum(1 for g in gone if g < d))


@rule(aten.stack.default)
def stack(ctx: RuleContext, n: fx.Node) -> Sharded:
    """Equal-shaped values stacked on a new dim (rotary's interleaved pairs,
    `stack((-x2, x1), -1)`): the sharded dims must agree; replicated operands are narrowed."""
    tensors = n.args[0]
    d0 = norm_dim(n.args[1] if len(n.args) > 1 else 0, len(node_shape(n)))
    specs = [ctx.placement(t) for t in tensors]
    sharded = [s for s in specs if isinstance(s, Sharded)]
    if any(not isinstance(s, Sharded) and s is not REPLICATE for s in specs) or \
            any(s.dims != sharded[0].dims for s in sharded):
        raise RuleFailure("stacks differently placed values")
    first = sharded[0]
    for i, s in enumerate(specs):
        if s is REPLICATE:
            for d, ds in first.dims:
                ctx.actions.narrows.append(Narrow(n.name, (0, i), d, None, ds))
    return first.moved(lambda d: d + 1 if d >= d0 else d)


@rule(aten.unbind.int)
def unbind(ctx: RuleContext, n: fx.Node) -> list:
    """The values along a whole dim (q, k, v of `qkv.view(b, s, 3, h, d).unbind(2)`)."""
    x, sp, src = ctx.sharded_input(n)
    d0 = norm_dim(n.args[1] if len(n.args) > 1 else 0, len(src))
    ds = sp.get(d0)
    if ds is not None:
        # each value is a chunk of the source (q | k | v): split every chunk on its own
        k = ds.size

        def make(cur: DimShard, unit: int) -> Optional[DimShard]:
            if cur.size != k * unit or len(cur.splits) != 1:
                return None
            new = DimShard(ctx.world_size, 1, (unit,) * k)
            return new if new.valid() else None
        ctx.refine_or_fail(sp, d0, make)
        raise RuleFailure("unbinds a sharded dim")
    out = sp.moved(lambda d: d - 1 if d > d0 else d)
    return [out for _ in n.meta.get("val", ())]


@rule(aten.expand_as.default)
def expand_as(ctx: RuleContext, n: fx.Node) -> Sharded:
    """x.expand_as(other): broadcast like a pointwise op of x and other."""
    return align(ctx, n, [(0,), (1,)], node_shape(n))


@rule(aten.expand.default, aten.broadcast_to.default)
def expand(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    off = len(n.args[1]) - len(src)
    dims = {d + off: s for d, s in sp.dims}
    for d, s in dims.items():
        rewrite_size(ctx, n, 1, d, s)
    return Sharded.of(dims, {d + off: o for d, o in sp.origin_dict().items()})


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(ctx: RuleContext, n: fx.Node) -> Sharded:
    """x.repeat_interleave(r, dim): each element r times in a row (Mamba-2's B and C groups
    repeated for the heads of each group). On a sharded dim each rank repeats the elements it
    holds, so the split scales by r; `output_size` becomes the local size."""
    x, sp, src = ctx.sharded_input(n)
    repeats = n.args[1]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    if dim is None:
        raise RuleFailure("repeat_interleave of a flattened sharded tensor")
    dim = norm_dim(dim, len(src))
    ds = sp.get(dim)
    if ds is None:
        return sp
    new = ds.scaled(repeats) if isinstance(repeats, int) else None
    if new is None or ds.outer:
        raise RuleFailure("repeat_interleave of a sharded dim by a run-time count")
    at = (3,) if len(n.args) > 3 else ("output_size",)
    if (n.args[3] if len(n.args) > 3 else n.kwargs.get("output_size")) is not None:
        ctx.actions.int_args.append(
            IntArg(n.name, at, per_rank(list(new.local_sizes(ctx.world_size)))))
    dims = sp.as_dict()
    dims[dim] = new
    return Sharded.of(dims, {d: o for d, o in sp.origin_dict().items() if d != dim})
