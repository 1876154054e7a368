"""Inserts one all-reduce after each partial sum, feeding the ops that need the full value."""
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
