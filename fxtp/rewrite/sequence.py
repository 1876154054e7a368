"""Sequence parallelism in this rank's graph: the region solve/sequence.py chose holds this
rank's tokens only.

    o  = linear(a, W_rows)                 o  = linear(a, W_rows)
    o  = all_reduce_sum(o)          ->     o  = reduce_scatter_seq(o, 1, ...)     # own tokens
    x2 = add(x, o)                         x2 = add(scatter_seq(x, 1, ...), o)     # x replicated
    h  = norm(x2)                          h  = norm(x2)
    q  = linear(h, W_cols)                 q  = linear(all_gather_seq(h, 1, ..., s, "sum"), W_cols)
    y  = view(h, [b, s, 64])               y  = view(h, [b, local_length(s, N, r), 64])

A partial sum whose users are all in the region is reduce-scattered instead of all-reduced;
one that something else reads whole keeps its all-reduce and the region's users read their
tokens of it. Sizes that are the sequence length become this rank's length; a size read off a
region value (`sym_size`) becomes the whole length again for the readers outside. Readers of
a region value that need the whole sequence get one all-gather: its backward reduce-scatters
the gradient when they compute sharded or partial results (their gradients are partial), and
takes the rank's tokens when they are replicated; readers of both kinds share one all-gather,
the replicated ones through `rank0_grad` so their (equal) gradients are counted once.
"""
from __future__ import annotations

import operator

from torch import fx

from ..graph.nodes import nodes_by_name, set_arg
from ..graph.ops import VIEWS, aten
from ..runtime.sequence import (
    all_gather_seq,
    local_length,
    rank0_grad,
    reduce_scatter_seq,
    scatter_seq,
)
from ..solve.placements import group_dims
from ..solve.sequence import reads_size
from .collectives import COLLECTIVE_META
from .context import RewriteContext
from .local_slices import NARROW_META


def _sequence_length(g: fx.Graph, nodes: dict, placeholder: str, dim: int) -> fx.Node:
    """A node giving the whole sequence length, right after the inputs (before every use)."""
    ph = nodes[placeholder]
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        size = g.call_function(aten.sym_size.int, (ph, dim))
    size.meta["val"] = ph.meta["val"].shape[dim]
    return size


def _spell_out_inferred(g: fx.Graph, view: fx.Node) -> None:
    """A region view's -1 size as the input sizes it stands for: a rank holding no tokens
    (a sequence shorter than the ranks) has an empty shard, where -1 is ambiguous."""
    x, sizes = view.args[0], view.args[1]
    if -1 not in sizes:
        return
    j = list(sizes).index(-1)
    groups = group_dims(list(x.meta["val"].shape), list(view.meta["val"].shape)) or []
    dims = next((gi for gi, go in groups if go == [j]), None)
    if not dims:
        return
    with g.inserting_before(view):
        size = g.call_function(aten.sym_size.int, (x, dims[0]))
        for d in dims[1:]:
            size = g.call_function(operator.mul, (size, g.call_function(aten.sym_size.int, (x, d))))
    view.args = (x, [size if k == j else v for k, v in enumerate(sizes)], *view.args[2:])


def _collective(g: fx.Graph, after: fx.Node, fn, args: tuple, op: str, of: str) -> fx.Node:
    with g.inserting_after(after):
        node = g.call_function(fn, args)
    node.meta.update(val=after.meta.get("val"), nn_module_stack=after.meta.get("nn_module_stack", {}))
    node.meta[COLLECTIVE_META] = {"op": op, "of": of}
    return node


def _reading(user: fx.Node, value: str) -> fx.Node:
    """What `user` reads for `value` now: the value, or the all-reduce put after it."""
    for a in user.all_input_nodes:
        if a.name == value or a.meta.get(COLLECTIVE_META, {}).get("of") == value:
            return a
    raise KeyError(f"{user.name} does not read {value}")


def shard_sequence(ctx: RewriteContext) -> tuple[str, ...]:
    """Runs after `all_reduces` (a kept all-reduce's region users read their tokens of it)
    and before `grad_syncs`. Returns the names of the collectives it inserted."""
    seq = ctx.actions.sequence
    if seq is None or not seq.dims:
        return ()
    gm, ws, rank, group = ctx.gm, ctx.world_size, ctx.rank, ctx.group_name
    g = gm.graph
    nodes = nodes_by_name(gm)
    whole = _sequence_length(g, nodes, seq.input, seq.input_dim)
    with g.inserting_after(whole):
        mine = g.call_function(local_length, (whole, ws, rank))
    inserted: list[str] = []
    region = set(seq.dims)

    for value, (dim, users) in seq.reduce_scatters.items():
        rs = _collective(g, nodes[value], reduce_scatter_seq, (nodes[value], dim, ws, rank, group),
                         "reduce_scatter", value)
        for u in users:
            nodes[u].replace_input_with(nodes[value], rs)
        inserted.append(rs.name)

    for value, (dim, users) in seq.scatters.items():
        cut: dict[fx.Node, fx.Node] = {}
        for u in users:
            src = _reading(nodes[u], value)
            if src not in cut:
                cut[src] = _collective(g, src, scatter_seq, (src, dim, ws, rank, group),
                                       "scatter", value)
                inserted.append(cut[src].name)
            nodes[u].replace_input_with(src, cut[src])

    for name in seq.dims:            # sizes read off a region value: the whole length outside
        n = nodes[name]
        for u in list(n.users):
            if reads_size(u) and u.args[1] % n.meta["val"].dim() == seq.dims[name]:
                u.replace_all_uses_with(whole)
    for name, path in seq.local_sizes:
        set_arg(nodes[name], path, mine)
    for name in seq.dims:
        if nodes[name].target in VIEWS:
            _spell_out_inferred(g, nodes[name])

    for gather in seq.gathers:
        value = nodes[gather.value]
        readers = [u for u in value.users if u.name not in region and not reads_size(u)]
        sharded = [u for u in readers if u.name in gather.sharded_users
                   or (NARROW_META in u.meta and u.users
                       and all(w.name in gather.sharded_users for w in u.users))]
        grad = "sum" if sharded else "slice"
        full = _collective(g, value, all_gather_seq,
                           (value, gather.dim, ws, rank, group, whole, grad), "all_gather",
                           gather.value)
        full.meta[COLLECTIVE_META]["grad"] = grad
        inserted.append(full.name)
        others = [u for u in readers if u not in sharded]
        once = full
        if sharded and others:
            with g.inserting_after(full):
                once = g.call_function(rank0_grad, (full, rank))
            once.meta.update(val=full.meta.get("val"))
        for u in readers:
            u.replace_input_with(value, once if u in others else full)
    return tuple(inserted)
