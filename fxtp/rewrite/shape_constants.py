"""Rewrites the size constants of view/reshape/expand/split/slice to this rank's local sizes.

HF graphs hard-code head counts and feature sizes (`reshape(x, [b, 4, s, 16])`, GQA's
`expand(k, [b, 2, 2, s, 16])`, GPT-2's `split(qkv, 64, 2)`); the solver says which constant
sits on a sharded dim and what it becomes. With uneven shards the value depends on the rank
(the solver then gives one per rank). A size computed at run time as batch x heads (BLOOM's
`[b * heads, s, d]`) gets a new node for batch x local heads.
"""
from __future__ import annotations

import operator

from ..graph.nodes import get_arg, nodes_by_name, set_arg
from .context import RewriteContext


def rewrite_shape_constants(ctx: RewriteContext) -> tuple[tuple[str, object, object], ...]:
    """Applies the solver's size rewrites for this rank:

        reshape(x, [b, s, 4, 16])  ->  reshape(x, [b, s, 2, 16])      (4 heads, 2 on this rank)
        view(x, [n, s, 16])        ->  view(x, [n * 2 // 4, s, 16])   (n = b * 4 at run time)

    Returns (node, old, new) for explain."""
    gm, actions, rank = ctx.gm, ctx.actions, ctx.rank
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
    return tuple(done)
