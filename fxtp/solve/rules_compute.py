"""Rules for ops that compute with a sharded value: pointwise ops (any op tagged pointwise),
attention, batched matmuls, the KV-cache write and depthwise convolutions. The ops that run
along dims (softmax, reductions, norms) are in `rules_along`.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..graph.ops import (
    CONVOLUTIONS,
    SDPA,
    aten,
    is_pointwise,
)
from .align import align
from .placements import REPLICATE, Sharded
from .records import IntArg, Narrow
from .registry import SHARDED_RULES, RuleContext, RuleFailure
from .shapes import arg_at, node_shape, norm_dim, per_rank, static_int

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
    holds is its own heads only (`sharded_placement` checks every in-place write)."""
    idx, src = n.args[2], n.args[3]
    out = node_shape(n)
    if out is None or node_shape(src) is None or len(node_shape(src)) != len(out):
        raise RuleFailure("index_copy with a source of another rank")
    if isinstance(ctx.placement(idx), Sharded):
        raise RuleFailure("index_copy with sharded indices")
    dim = norm_dim(n.args[1], len(out))
    return align(ctx, n, [(0,), (3,)], out, forbid=[dim])


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
