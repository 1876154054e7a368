"""Partial sums: one all-reduce after each, feeding the ops that need the full value; constants
added to a partial sum are added on rank 0 only.

The all-reduce is `runtime.all_reduce_sum` (Megatron's g: identity backward), so the graph can
also be trained."""
from __future__ import annotations

from torch import fx

from ..capture.linear import BIAS_META
from ..graph.nodes import nodes_by_name
from ..runtime.collectives import all_reduce_sum, grad_only_add
from ..solve.solver import Actions

COLLECTIVE_META = "fxtp_collective"


def insert_all_reduces(gm: fx.GraphModule, actions: Actions, group_name: str) -> list[str]:
    """Returns the names of the inserted all-reduce nodes."""
    nodes = nodes_by_name(gm)
    g = gm.graph
    inserted = []
    for value_name, user_names in actions.reduces.items():
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
    return inserted


def keep_constant_adds_on_rank0(gm: fx.GraphModule, actions: Actions, rank: int) -> None:
    """A constant added to a partial sum is added by rank 0 only. The other ranks skip the add
    but keep the node (same name) as `grad_only_add`, which passes the partial sum through and
    still gives the constant its gradient when training."""
    if rank == 0:
        return
    nodes = nodes_by_name(gm)
    for add_name, partial_name in actions.rank0_adds:
        add = nodes[add_name]
        partial = nodes[partial_name]
        const = add.args[1] if add.args[0] is partial else add.args[0]
        add.target, add.args, add.kwargs = grad_only_add, (partial, const), {}
        add.meta.pop(BIAS_META, None)   # no longer a bias add: cleanup must not fuse it back
