"""Means over a sharded dim, made partial sums: each rank takes the mean of its own elements and
scales it by its share of them, so that the all-reduced sum is the mean over all of them (an
RMSNorm over the heads a column-parallel linear split):

    mean(x_shard, [-1], True)  ->  mul(mean(x_shard, [-1], True), 0.5)    (32 of 64 features)

The node keeps its name (the all-reduce after it and the plan's records refer to it); the mean
itself moves into a new node before it. Runs after the all-reduces and the gradient syncs are
placed, so those passes see the graph the solver described.
"""
from __future__ import annotations

import torch

from ..graph.nodes import nodes_by_name
from .context import RewriteContext

aten = torch.ops.aten


def rescale_partial_means(ctx: RewriteContext) -> None:
    """Applies the solver's `Rescale` records for this rank."""
    nodes = nodes_by_name(ctx.gm)
    g = ctx.gm.graph
    for name, factor in ctx.actions.rescales:
        node = nodes[name]
        share = factor[ctx.rank] if isinstance(factor, tuple) else factor
        with g.inserting_before(node):
            mean = g.call_function(node.target, node.args, node.kwargs)
        mean.meta = dict(node.meta)
        node.target, node.args, node.kwargs = aten.mul.Tensor, (mean, share), {}
