"""Rewrites the size constants of view/reshape/expand/split/slice to this rank's local sizes.

HF graphs hard-code head counts and feature sizes (`reshape(x, [b, 4, s, 16])`, GQA's
`expand(k, [b, 2, 2, s, 16])`, GPT-2's `split(qkv, 64, 2)`); the solver says which constant
sits on a sharded dim and what it becomes. Local sizes are equal on every rank.
"""
from __future__ import annotations

from torch import fx

from ..solver import Actions
from ._util import nodes_by_name, set_arg


def rewrite_shape_constants(gm: fx.GraphModule, actions: Actions) -> list[tuple[str, object, int]]:
    """Applies the solver's int rewrites; returns (node, old value, new value) for explain."""
    nodes = nodes_by_name(gm)
    done = []
    for name, path, value in actions.int_args:
        node = nodes[name]
        from ._util import get_arg
        old = get_arg(node, path)
        set_arg(node, path, value)
        done.append((name, old, value))
    return done
