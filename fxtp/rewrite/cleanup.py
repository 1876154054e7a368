"""The last passes: bias adds fused back into their linears, dead nodes dropped, and the tensors
the graph still shares with the capture copied.
"""
from __future__ import annotations

from ..capture.linear import fuse_biases
from ..graph.tensors import own_tensors
from .context import RewriteContext


def cleanup(ctx: RewriteContext) -> None:
    """Fuses the bias adds split off at capture and drops dead nodes:

        add(linear(x, W), b)   ->  linear(x, W, b)     (not after an all-reduce: kept apart)
        unused = slice(x, ...) ->  (removed)"""
    fuse_biases(ctx.gm)
    ctx.gm.graph.eliminate_dead_code()


def own_copies(ctx: RewriteContext) -> None:
    """Copies every tensor the graph still shares with the capture (`graph.tensors.own_tensors`),
    the graph unchanged:

        get_attr norm.weight (the user's tensor)  ->  get_attr norm.weight (tp's own copy)"""
    own_tensors(ctx.gm, ctx.full, ctx.on_read)
