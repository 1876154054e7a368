"""Rewrites the size constants of view/reshape/expand/split/slice to this rank's local sizes.

HF graphs hard-code head counts and feature sizes (`reshape(x, [b, 4, s, 16])`, GQA's
`expand(k, [b, 2, 2, s, 16])`, GPT-2's `split(qkv, 64, 2)`); the solver says which constant
sits on a sharded dim and what it becomes. With uneven shards the value depends on the rank
(the solver then gives one per rank). A size computed at run time as batch x heads (BLOOM's
`[b * heads, s, d]`) gets a new node for batch x local heads.
"""
from __future__ import annotations

import operator

from torch import fx

from ..graph.nodes import get_arg, nodes_by_name, set_arg
from ..solve.solver import Actions


def rewrite_shape_constants(gm: fx.GraphModule, actions: Actions,
                            rank: int = 0) -> list[tuple[str, object, int]]:
    """Applies the solver's size rewrites for `rank`; returns (node, old, new) for explain."""
    nodes = nodes_by_name(gm)
    done = []
    for name, path, value in actions.int_args:
        node = nodes[name]
        old = get_arg(node, path)
        new = value[rank] if isinstance(value, tuple) else value
        set_arg(node, path, new)
        done.append((name, old, new))
    for name, path, block, local in actions.sym_sizes:
        node = nodes[name]
        full = get_arg(node, path)
        new = local[rank] if isinstance(local, tuple) else local
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(operator.floordiv, (
                gm.graph.call_function(operator.mul, (full, new)), block))
        set_arg(node, path, scaled)
        done.append((name, f"{full.name} (= outer x {block})", f"outer x {new}"))
    return done
