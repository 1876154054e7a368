"""Rules for ops that run along dims: softmax, reductions, selections, cumulative ops, triangles
and norms. None of them may run along a sharded dim, with two exceptions that the plan prefers
to keeping the layer's weights whole: a sum or mean over a sharded dim becomes a partial sum
(all-reduced where it is used), and a LayerNorm or RMSNorm over sharded features computes its
statistic from all-reduced partial sums (`rewrite/norm_statistics`), as does an L2 vector norm.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..graph.nodes import arg_or_kwarg
from ..graph.ops import (
    NORMS,
    PARTIAL_STATISTICS,
    REDUCTIONS,
    RUN_ALONG,
    SELECT_ALONG,
    SOFTMAX,
    STATISTIC_NORMS,
    TRIANGLES,
    aten,
)
from .placements import REPLICATE, DimShard, Partial, Sharded
from .records import Narrow, Rescale
from .registry import SHARDED_RULES, RuleContext, RuleFailure
from .shapes import arg_at, norm_dim, per_rank, static_prod

rule = SHARDED_RULES.rule


# -- ops running along dims -----------------------------------------------------------------------
@rule(*SOFTMAX)
def softmax(ctx: RuleContext, n: fx.Node) -> Sharded:
    x, sp, src = ctx.sharded_input(n)
    if sp.get(norm_dim(n.args[1], len(src))) is not None:
        raise RuleFailure(f"{n.target} runs along a sharded dim")
    if n.target in SOFTMAX or len(n.all_input_nodes) == 1:
        return sp
    raise RuleFailure("unexpected operands")


@rule(*REDUCTIONS)
def reduction(ctx: RuleContext, n: fx.Node) -> Any:
    x, sp, src = ctx.sharded_input(n)
    dims, keep = _dims_and_keep(n, len(src))
    if any(d in dims for d, _ in sp.dims):
        return partial_statistic(ctx, n, sp, src, dims)
    return _reduced(sp, dims, keep)


def _dims_and_keep(n: fx.Node, rank: int) -> tuple[set, bool]:
    """The dims an `(x, dim, keepdim)` op reduces (non-negative) and its keepdim."""
    dims = arg_or_kwarg(n, 1, "dim")
    if dims is None:
        raise RuleFailure(f"{n.target} over all dims of a sharded tensor")
    dims = {norm_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    return dims, bool(arg_or_kwarg(n, 2, "keepdim", False))


def _reduced(sp: Sharded, dims: set, keep: bool) -> Sharded:
    """`sp` after reducing `dims` (none of them sharded)."""
    if keep:
        return sp
    shift = lambda d: d - sum(1 for g in dims if g < d)
    return Sharded.of({shift(d): s for d, s in sp.dims})


def partial_statistic(ctx: RuleContext, n: fx.Node, sp: Sharded, src: list, dims: set) -> Partial:
    """A sum or mean over the sharded dims (an RMSNorm's mean of squares over the heads a
    column-parallel linear split): each rank reduces its own elements and the result is a
    partial sum, all-reduced where it is used (a `[b, s, 1]` statistic, not the weights kept
    whole). A mean is rescaled by this rank's share of the elements. Elements that several
    ranks hold (kv heads replicated per group) are first narrowed to one holder each. The
    sharded values must come from column-parallel sources alone: features that met a
    replicated activation cut to match them are a residual stream, which stays whole."""
    if n.target not in PARTIAL_STATISTICS or not ctx.partial_statistics:
        raise RuleFailure(f"{n.target} reduces over a sharded dim")
    if any(d not in dims for d, _ in sp.dims):
        raise RuleFailure(f"{n.target} reduces over one sharded dim and keeps another")
    if _mixes_an_activation(ctx, n.args[0]):
        # a replicated activation was cut to meet these features: a residual stream sharded
        # by a stray column source, not worth a statistic (it stays whole, as in Megatron)
        raise RuleFailure(f"{n.target} reduces over a sharded dim that mixes a replicated "
                          "activation")
    counts = [1] * ctx.world_size
    for d, ds in sp.dims:
        if ds.outer:
            raise RuleFailure(f"{n.target} reduces over a dim holding a sharded block")
        if not ds.disjoint(ctx.world_size):
            want = DimShard(ctx.world_size, 1, ds.chunks)
            if not (want.valid() and ds.covers(want, ctx.world_size)):
                raise RuleFailure(f"{n.target} reduces over a sharded dim whose {ds.size} "
                                  f"elements cannot be split into {ctx.world_size} disjoint "
                                  "parts inside what each rank holds")
            ctx.actions.narrows.append(Narrow(n.name, (0,), d, ds, want))
            ds = want
        counts = [c * ds.local_size_of(r) for r, c in enumerate(counts)]
    if n.target == aten.mean.dim:
        full = static_prod([src[d] for d, _ in sp.dims])
        ctx.actions.rescales.append(Rescale(n.name, per_rank([c / full for c in counts])))
    ctx.actions.statistics.append(n.name)
    return Partial()


def _check_statistic(ctx: RuleContext, n: fx.Node, sp: Sharded) -> None:
    """A norm's statistic sums each feature once: over features a linear split (not a
    residual stream met by a stray column source), each held by one rank."""
    if _mixes_an_activation(ctx, n.args[0]):
        raise RuleFailure("normalises over a sharded dim that mixes a replicated activation")
    for _, ds in sp.dims:
        if ds.outer or not ds.disjoint(ctx.world_size):
            raise RuleFailure("normalises over a sharded dim whose elements several ranks hold")


def _mixes_an_activation(ctx: RuleContext, x: fx.Node) -> bool:
    """Whether a replicated run-time value (not computed from parameters and buffers alone)
    was narrowed to meet the sharded values `x` is computed from, back to the column
    sources."""
    narrowed: dict[str, list] = {}
    for nw in ctx.actions.narrows:
        if nw.have is None:
            narrowed.setdefault(nw.user, []).append(nw.path)
    seen, stack = set(), [x]
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(ctx.placement(node), Sharded):
            continue
        seen.add(node)
        if any(_activation(ctx, arg_at(node, path)) for path in narrowed.get(node.name, ())):
            return True
        stack.extend(node.all_input_nodes)
    return False


def _activation(ctx: RuleContext, value) -> bool:
    """A replicated value computed at run time from the model's inputs (not `D[:, None]`, nor
    a piece of a column source that every rank holds whole: Mamba-2's B and C)."""
    return (ctx.from_inputs(value) and ctx.placement(value) is REPLICATE
            and value not in ctx.whole_pieces)


@rule(*SELECT_ALONG)
def select_along(ctx: RuleContext, n: fx.Node) -> Any:
    """max/min/argmax/logsumexp along whole dims (an attention sink's max over the keys)."""
    x, sp, src = ctx.sharded_input(n)
    dims, keep = _dims_and_keep(n, len(src))
    if any(d in dims for d, _ in sp.dims):
        raise RuleFailure(f"{n.target} runs along a sharded dim")
    out = _reduced(sp, dims, keep)
    return [out, out] if isinstance(n.meta.get("val"), (list, tuple)) else out


@rule(*RUN_ALONG)
def run_along(ctx: RuleContext, n: fx.Node) -> Any:
    """topk/sort/cumsum along a whole dim: the shape's other dims keep their placement."""
    x, sp, src = ctx.sharded_input(n)
    at = RUN_ALONG[n.target]
    dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", -1)
    if sp.get(norm_dim(dim, len(src))) is not None:
        raise RuleFailure(f"{n.target} runs along a sharded dim")
    return [sp, sp] if isinstance(n.meta.get("val"), (list, tuple)) else sp


@rule(*TRIANGLES)
def triangle(ctx: RuleContext, n: fx.Node) -> Sharded:
    """tril/triu work on the last two dims (a chunked scan's causal mask over positions): the
    other dims (heads) keep their placement."""
    x, sp, src = ctx.sharded_input(n)
    if any(d >= len(src) - 2 for d, _ in sp.dims):
        raise RuleFailure(f"{n.target} of a sharded matrix dim")
    return sp


@rule(*NORMS)
def norm(ctx: RuleContext, n: fx.Node) -> Any:
    x, sp, src = ctx.sharded_input(n)
    if any(isinstance(ctx.placement(a), Sharded) for a in n.all_input_nodes if a is not x):
        raise RuleFailure("normalisation with sharded affine parameters")
    k = len(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) else 1
    if any(d >= len(src) - k for d, _ in sp.dims):
        return norm_statistic(ctx, n, sp, src, k)
    if n.target == aten.native_layer_norm.default:
        return [sp, sp, sp]
    return sp


def norm_statistic(ctx: RuleContext, n: fx.Node, sp: Sharded, src: list, k: int) -> Sharded:
    """A LayerNorm or RMSNorm over features a column-parallel linear split (a sub-norm before
    the row-parallel linear, a q/k norm over all heads): each rank sums its own features (and
    their squares) in fp32, one all-reduce of that `[..., 2]` statistic gives every rank the
    mean and variance, and each rank normalises its own features with its slice of the
    weight and bias. The output keeps the input's sharding; the weights stay sharded for the
    cost of a tiny per-token all-reduce."""
    if n.target not in STATISTIC_NORMS or not ctx.partial_statistics:
        raise RuleFailure("normalises over a sharded dim")
    if any(d < len(src) - k for d, _ in sp.dims):
        raise RuleFailure(f"{n.target} normalises over one sharded dim and keeps another")
    _check_statistic(ctx, n, sp)
    first = len(src) - k
    affine = [(i,) for i in (2, 3) if len(n.args) > i and isinstance(n.args[i], fx.Node)]
    for path in affine:
        for d, ds in sp.dims:
            ctx.actions.narrows.append(Narrow(n.name, path, d - first, None, ds))
    ctx.actions.norm_statistics[n.name] = static_prod(src[first:])
    ctx.actions.statistics.append(n.name)
    return sp


@rule(aten.linalg_vector_norm.default)
def vector_norm(ctx: RuleContext, n: fx.Node) -> Any:
    """`linalg_vector_norm(x, ord, dim, keepdim)`: over whole dims the other dims keep their
    placement. An L2 norm over the sharded features (`F.normalize` of a column-parallel
    output) is a statistic: the squares summed locally, all-reduced, the square root taken on
    every rank (`rewrite/norm_statistics`); the result is whole on every rank."""
    x, sp, src = ctx.sharded_input(n)
    dims = arg_or_kwarg(n, 2, "dim")
    if dims is None:
        raise RuleFailure(f"{n.target} over all dims of a sharded tensor")
    dims = {norm_dim(d, len(src)) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = bool(arg_or_kwarg(n, 3, "keepdim"))
    if not any(d in dims for d, _ in sp.dims):
        return _reduced(sp, dims, keep)
    order = arg_or_kwarg(n, 1, "ord")
    if order not in (None, 2, 2.0) or not ctx.partial_statistics:
        raise RuleFailure(f"{n.target} (ord={order}) over a sharded dim")
    if any(d not in dims for d, _ in sp.dims):
        raise RuleFailure(f"{n.target} over one sharded dim that keeps another")
    _check_statistic(ctx, n, sp)
    ctx.actions.norm_statistics[n.name] = static_prod([src[d] for d in sorted(dims)])
    ctx.actions.statistics.append(n.name)
    return REPLICATE

