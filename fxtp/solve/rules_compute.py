"""Rules for ops that compute with a sharded value: pointwise ops (any op tagged pointwise),
attention, batched matmuls, the KV-cache write, and the ops that run along dims (softmax,
reductions, norms), which may not run along a sharded one.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..graph.ops import (
    CONVOLUTIONS,
    NORMS,
    PARTIAL_STATISTICS,
    REDUCTIONS,
    RUN_ALONG,
    SDPA,
    SELECT_ALONG,
    SOFTMAX,
    TRIANGLES,
    aten,
    functional_twin,
    is_pointwise,
)
from .align import align
from .placements import REPLICATE, DimShard, Partial, Sharded
from .records import IntArg, Narrow, Rescale
from .registry import SHARDED_RULES, RuleContext, RuleFailure
from .shapes import arg_at, node_shape, norm_dim, per_rank, static_int, static_prod

rule = SHARDED_RULES.rule


# -- operands aligned dim by dim ------------------------------------------------------------------
@SHARDED_RULES.tag_rule(is_pointwise)
def pointwise(ctx: RuleContext, n: fx.Node) -> Sharded:
    out = node_shape(n)
    if out is None:
        raise RuleFailure("pointwise op without a tensor result")
    paths = []
    for i, a in enumerate(n.args):
        if isinstance(a, fx.Node) and node_shape(a) is not None:
            paths.append((i,))
    for k, a in n.kwargs.items():
        if isinstance(a, fx.Node) and node_shape(a) is not None:
            paths.append((k,))
    return align(ctx, n, paths, out)


@rule(aten.copy.default)
def copy_into(ctx: RuleContext, n: fx.Node) -> Sharded:
    """copy(dst, src): src's values, broadcast, in dst's shape (an in-place slice assignment
    functionalised): the operands align as in a pointwise op."""
    return align(ctx, n, [(0,), (1,)], node_shape(n))


@rule(*SDPA)
def sdpa(ctx: RuleContext, n: fx.Node) -> Sharded:
    out = node_shape(n.args[0])
    r = len(out)
    operands = [(i,) for i in range(3)]
    if len(n.args) > 3 and isinstance(n.args[3], fx.Node):
        operands.append((3,))
    if n.kwargs.get("enable_gqa"):
        raise RuleFailure("sdpa with enable_gqa has no sharding rule yet")
    return align(ctx, n, operands, out, forbid=[r - 2, r - 1], allow_rank_diff=True)


@rule(aten.bmm.default, aten.matmul.default)
def matmul(ctx: RuleContext, n: fx.Node) -> Any:
    a, b = n.args[0], n.args[1]
    sa, sb = node_shape(a), node_shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise RuleFailure("matmul of vectors on sharded values")
    out = node_shape(n)
    pa, pb = ctx.placement(a), ctx.placement(b)
    ka = pa.get(len(sa) - 1) if isinstance(pa, Sharded) else None
    kb = pb.get(len(sb) - 2) if isinstance(pb, Sharded) else None
    if ka is not None or kb is not None:
        raise RuleFailure("matmul contracts a sharded dim")
    for p, s, d in ((pa, sa, len(sa) - 2), (pb, sb, len(sb) - 1)):
        if isinstance(p, Sharded) and p.get(d) is not None:
            raise RuleFailure("matmul with a sharded row/column dim")
    # batch dims behave like broadcasting
    return align(ctx, n, [(0,), (1,)], out, forbid=[len(out) - 2, len(out) - 1],
                 allow_rank_diff=True, trailing=2)


@rule(aten.baddbmm.default)
def baddbmm(ctx: RuleContext, n: fx.Node) -> Sharded:
    out = node_shape(n)
    return align(ctx, n, [(0,), (1,), (2,)], out, forbid=[len(out) - 2, len(out) - 1],
                 allow_rank_diff=True)


@rule(aten.index_copy.default)
def index_copy(ctx: RuleContext, n: fx.Node) -> Sharded:
    """x.index_copy_(dim, idx, src): src written into x at `idx` along `dim` (a static KV
    cache being filled, `[b, kv_heads, max_len, d]`). The indexed dim must be whole; the
    other dims align as in a pointwise op, so a replicated x meeting a src sharded by heads
    keeps only this rank's heads. Written in place, x must then be a tensor attribute (a
    cache buffer) used nowhere else: it is sliced once, in place, and the cache each rank
    holds is its own heads only."""
    x, idx, src = n.args[0], n.args[2], n.args[3]
    out = node_shape(n)
    if out is None or node_shape(src) is None or len(node_shape(src)) != len(out):
        raise RuleFailure("index_copy with a source of another rank")
    if isinstance(ctx.placement(idx), Sharded):
        raise RuleFailure("index_copy with sharded indices")
    dim = norm_dim(n.args[1], len(out))
    before = len(ctx.actions.narrows)
    result = align(ctx, n, [(0,), (3,)], out, forbid=[dim])
    in_place = n.target is not functional_twin(n.target)
    narrowed_self = any(nw.path == (0,) for nw in ctx.actions.narrows[before:])
    if in_place and narrowed_self and not (x.op == "get_attr" and len(x.users) == 1):
        raise RuleFailure("writes a sharded value in place into a replicated tensor that is "
                          "read elsewhere too (it cannot be sliced in place)")
    return result


@rule(*CONVOLUTIONS)
def depthwise_conv(ctx: RuleContext, n: fx.Node) -> Sharded:
    """A depthwise convolution along time (`groups` = channels, weight `[C, 1, k]`: Mamba's
    conv over the inner dim) is a per-channel filter, so it shards with its channels, as
    Megatron and vLLM shard Mamba: the input `[b, C, L]` split on C, the weight and bias cut
    to this rank's channels, `groups` the local channel count. The batch and time dims stay
    whole (the filter runs along time)."""
    x, sp, src = ctx.sharded_input(n)
    weight, bias = n.args[1], arg_at(n, (2,)) if len(n.args) > 2 else None
    channel = len(src) - 2
    ds = sp.get(channel)
    groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
    wshape = node_shape(weight)
    if ds is None or len(sp.dims) != 1:
        raise RuleFailure(f"{n.target} of a value sharded on other dims than its channels")
    if (wshape is None or str(groups) != str(src[channel]) or len(n.args) < 7
            or static_int(wshape[1]) != 1):
        raise RuleFailure(f"{n.target} mixes channels (only a depthwise convolution, groups = "
                          "channels, shards with its channels)")
    for path, operand in (((1,), weight), ((2,), bias)):
        if operand is None:
            continue
        if ctx.placement(operand) is not REPLICATE:
            raise RuleFailure(f"{n.target} with a sharded weight")
        ctx.actions.narrows.append(Narrow(n.name, path, 0, None, ds))
    ctx.actions.int_args.append(IntArg(n.name, (6,), per_rank(list(ds.local_sizes(ctx.world_size)))))
    return sp


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
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        raise RuleFailure(f"{n.target} over all dims of a sharded tensor")
    dims = {norm_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    return dims, bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))


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
        raise RuleFailure("normalises over a sharded dim")
    if n.target == aten.native_layer_norm.default:
        return [sp, sp, sp]
    return sp
