"""Partial sums: one all-reduce after each, feeding the ops that need the full value; constants
added to a partial sum are added on rank 0 only.

The all-reduce is `runtime.all_reduce_sum` (Megatron's g: identity backward), so the graph can
also be trained."""
from __future__ import annotations

from ..capture.linear import BIAS_META
from ..graph.nodes import nodes_by_name
from ..runtime.collectives import all_reduce_sum, grad_only_add
from .context import RewriteContext

COLLECTIVE_META = "fxtp_collective"


def insert_all_reduces(ctx: RewriteContext) -> tuple[str, ...]:
    """One all-reduce after each partial sum, read by the users that need the full value:

        user(linear(x_shard, W_rows))  ->  user(all_reduce_sum(linear(x_shard, W_rows), group))

    Returns the names of the inserted all-reduce nodes."""
    gm, group_name = ctx.gm, ctx.group_name
    nodes = nodes_by_name(gm)
    g = gm.graph
    inserted = []
    for value_name, user_names in ctx.actions.reduces.items():
        value = nodes[value_name]
        with g.inserting_after(value):
            waited = g.call_function(all_reduce_sum, (value, group_name))
        waited.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
        waited.meta[COLLECTIVE_META] = {"op": "all_reduce", "of": value_name}
        if "val" in value.meta:
            waited.meta["val"] = value.meta["val"]
        for u in user_names:
            nodes[u].replace_input_with(value, waited)
        inserted.append(waited.name)
    return tuple(inserted)


def keep_constant_adds_on_rank0(ctx: RewriteContext) -> None:
    """A constant added to a partial sum is added by rank 0 only. The other ranks skip the add
    but keep the node (same name) as `grad_only_add`, which passes the partial sum through and
    still gives the constant its gradient when training:

        add(partial, b)  ->  add(partial, b)                 (rank 0)
        add(partial, b)  ->  grad_only_add(partial, b)       (other ranks)"""
    if ctx.rank == 0:
        return
    nodes = nodes_by_name(ctx.gm)
    for add_name, partial_name in ctx.actions.rank0_adds:
        add = nodes[add_name]
        partial = nodes[partial_name]
        const = add.args[1] if add.args[0] is partial else add.args[0]
        add.target, add.args, add.kwargs = grad_only_add, (partial, const), {}
        add.meta.pop(BIAS_META, None)   # no longer a bias add: cleanup must not fuse it back
