"""Partial sums: one all-reduce after each, feeding the ops that need the full value; constants
added to a partial sum are added on rank 0 only."""
from __future__ import annotations

from torch import fx

from ..runtime import ALL_REDUCE, WAIT
from ..solver import Actions
from ._util import nodes_by_name

COLLECTIVE_META = "fxtp_collective"


def insert_all_reduces(gm: fx.GraphModule, actions: Actions, group_name: str) -> list[str]:
    """Returns the names of the inserted wait nodes (one per all-reduce)."""
    nodes = nodes_by_name(gm)
    g = gm.graph
    inserted = []
    for value_name, user_names in actions.reduces.items():
        value = nodes[value_name]
        with g.inserting_after(value):
            reduced = g.call_function(ALL_REDUCE, (value, "sum", group_name))
        with g.inserting_after(reduced):
            waited = g.call_function(WAIT, (reduced,))
        for n in (reduced, waited):
            n.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
            n.meta[COLLECTIVE_META] = {"op": "all_reduce", "of": value_name}
        if "val" in value.meta:
            waited.meta["val"] = value.meta["val"]
        for u in user_names:
            nodes[u].replace_input_with(value, waited)
        inserted.append(waited.name)
    return inserted


def keep_constant_adds_on_rank0(gm: fx.GraphModule, actions: Actions, rank: int) -> None:
    """A constant added to a partial sum is added by rank 0 only; other ranks skip the add."""
    if rank == 0:
        return
    nodes = nodes_by_name(gm)
    for add_name, partial_name in actions.rank0_adds:
        add = nodes[add_name]
        add.replace_all_uses_with(nodes[partial_name])
        gm.graph.erase_node(add)
