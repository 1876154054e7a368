"""LayerNorms, RMSNorms and L2 norms over features split across the ranks, computed from an
all-reduced statistic: each rank sums its own features and their squares in fp32, one
all-reduce gives the full sums, and each rank normalises its own features with its slice of
the weight and bias (`local_slices` cut those). A sub-LayerNorm over 64 features split 32 | 32:

    layer_norm(x, [64], w, b, 1e-5)                       (x, w, b: this rank's 32 features)
 -> xf = _to_copy(x, float32)
    stat = cat([sum(xf, [-1], True), sum(xf * xf, [-1], True)], -1)      [..., 2]
    stat = copy_to_region(all_reduce_sum(stat))
    mean = stat[..., 0:1] / 64;  var = clamp_min(stat[..., 1:2] / 64 - mean * mean, 0)
    layer_norm = type_as((xf - mean) * rsqrt(var + 1e-5) * w + b, x)

An RMSNorm all-reduces `sum(xf * xf)` alone; an L2 `linalg_vector_norm` (`F.normalize`) too,
and takes its square root. As in torch's norms, the statistic and the affine are computed in
fp32 (fp64 for fp64 inputs) and the result is cast back to the input's dtype.
`copy_to_region` makes the backward sum the statistic's gradient over the ranks too (each
rank's features use the full statistic). The norm node keeps its name: its users and the
plan's records refer to it. Runs after the gradient syncs, which do not see these nodes.
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph.nodes import arg_or_kwarg, nodes_by_name
from ..runtime.collectives import all_reduce_sum, copy_to_region
from .collectives import COLLECTIVE_META
from .context import RewriteContext

aten = torch.ops.aten


def expand_norm_statistics(ctx: RewriteContext) -> None:
    """Rewrites each norm the solver gave a statistic (`Actions.norm_statistics`); the
    all-reduces it inserts join the record's `all_reduce_nodes`."""
    nodes = nodes_by_name(ctx.gm)
    inserted = []
    for name, count in ctx.actions.norm_statistics.items():
        inserted.append(_expand(ctx.gm.graph, nodes[name], count, ctx.group_name))
    ctx.record["all_reduce_nodes"] = tuple(ctx.record.get("all_reduce_nodes", ())) + tuple(inserted)


def _expand(g: fx.Graph, node: fx.Node, count: int, group_name: str) -> str:
    x = node.args[0]
    compute = torch.float64 if _dtype(x) == torch.float64 else torch.float32

    def call(target, *args, **kwargs) -> fx.Node:
        out = g.call_function(target, args, kwargs)
        out.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        return out

    def all_reduced(stat: fx.Node) -> fx.Node:
        reduced = call(all_reduce_sum, stat, group_name)
        reduced.meta[COLLECTIVE_META] = {"op": "all_reduce", "of": stat.name}
        return call(copy_to_region, reduced, group_name)

    with g.inserting_before(node):
        xf = call(aten._to_copy.default, x, dtype=compute)
        squares = call(aten.mul.Tensor, xf, xf)
        if node.target == aten.linalg_vector_norm.default:
            dims, keep = arg_or_kwarg(node, 2, "dim"), bool(arg_or_kwarg(node, 3, "keepdim"))
            total = all_reduced(call(aten.sum.dim_IntList, squares,
                                     [dims] if isinstance(dims, int) else list(dims), keep))
            node.target, node.args = aten._to_copy.default, (call(aten.sqrt.default, total),)
            node.kwargs = {"dtype": _dtype(node)}
            return total.args[0].name
        layer = node.target == aten.layer_norm.default
        dims = list(range(-len(node.args[1]), 0))
        weight = arg_or_kwarg(node, 2, "weight")
        bias = arg_or_kwarg(node, 3, "bias") if layer else None
        eps = arg_or_kwarg(node, 4 if layer else 3, "eps")
        if eps is None:
            eps = 1e-5 if layer else torch.finfo(compute).eps     # as torch's own norms
        stat = call(aten.sum.dim_IntList, squares, dims, True)
        if layer:
            stat = call(aten.cat.default, [call(aten.sum.dim_IntList, xf, dims, True), stat], -1)
        stat = all_reduced(stat)
        if layer:
            mean = call(aten.div.Tensor, call(aten.slice.Tensor, stat, -1, 0, 1), count)
            square = call(aten.div.Tensor, call(aten.slice.Tensor, stat, -1, 1, 2), count)
            var = call(aten.clamp_min.default,
                       call(aten.sub.Tensor, square, call(aten.mul.Tensor, mean, mean)), 0.0)
            xf = call(aten.sub.Tensor, xf, mean)
        else:
            var = call(aten.div.Tensor, stat, count)
        y = call(aten.mul.Tensor, xf, call(aten.rsqrt.default, call(aten.add.Tensor, var, eps)))
        if weight is not None:
            y = call(aten.mul.Tensor, y, weight)
        if bias is not None:
            y = call(aten.add.Tensor, y, bias)
    node.target, node.args, node.kwargs = aten.type_as.default, (y, x), {}
    return stat.args[0].name



def _dtype(x: fx.Node) -> torch.dtype:
    val = x.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32
