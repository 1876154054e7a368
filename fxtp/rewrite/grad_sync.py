"""Makes the rewritten graph trainable: puts Megatron's f where a rank's gradient is partial.

Forward, every rank computes a shard or a summand of the full computation; backward, autograd
runs the same per-rank graph. Gradients of sharded and partial values then already are the
right local pieces (the all-reduces are `all_reduce_sum`, whose backward is the identity), with
two exceptions that this pass fixes:

- A replicated value consumed by an op whose output is sharded or a partial sum (the input of
  a column-parallel linear, a replicated operand narrowed to a shard, a replicated weight
  applied to a partial sum): each rank's gradient only covers its own shard's use. It gets
  `copy_to_region` (f: identity forward, all-reduce backward), once per value.
- A parameter piece held by several ranks (GQA kv heads replicated when kv_heads < world size):
  each rank's gradient only covers the query heads it holds; `sum_over_replicas` sums it over
  the ranks holding the same piece.
- With sequence parallelism, a replicated value read by an op that holds the rank's tokens
  (a norm's weight) has a gradient from those tokens only: f as well; the parameters among them
  share one `sum_grads_over_ranks` (one all-reduce at the end of backward). An all-gathered
  sequence whose readers compute sharded results is local (its backward reduce-scatters).

A parameter sliced to this rank (and anything computed from it alone) is local, not
replicated: its gradient is already the slice of the full one. A constant added to a partial
sum on rank 0 only gets its full gradient locally (`collectives.keep_constant_adds_on_rank0`).
Both helpers are identity views forward: inference costs nothing extra.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..capture.linear import LinearMatch
from ..graph.nodes import get_arg, get_tensor_attr, nodes_by_name
from ..graph.ops import functional_twin
from ..runtime.collectives import (
    all_reduce_sum,
    copy_to_region,
    sum_grads_over_ranks,
    sum_over_replicas,
)
from ..runtime.sequence import all_gather_seq, rank0_grad
from ..solve.placements import REPLICATE, DimShard, Partial, SequenceShard, Sharded
from ..solve.solver import Actions
from .context import RewriteContext
from .local_slices import NARROW_META

aten = torch.ops.aten
GRAD_SYNC_META = "fxtp_grad_sync"


def _distributed(p) -> bool:
    if isinstance(p, (list, tuple)):
        return any(_distributed(x) for x in p)
    return isinstance(p, (Sharded, Partial, SequenceShard))


def _gathered(n: fx.Node) -> str:
    """The backward of a sequence all-gather (rewrite/sequence.py): "sum" or "slice"; else ""."""
    if n.op == "call_function" and n.target is all_gather_seq:
        return n.args[6]
    return ""


def _attr(gm: fx.GraphModule, n: fx.Node):
    try:
        return get_tensor_attr(gm, n.target)
    except AttributeError:
        return None


def _float_tensor(gm: fx.GraphModule, n: fx.Node) -> bool:
    val = _attr(gm, n) if n.op == "get_attr" else n.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _duplicated_params(gm: fx.GraphModule, actions: Actions, linears: dict[str, LinearMatch],
                       world_size: int) -> dict[int, tuple[int, DimShard]]:
    """Tensor identity -> (sliced dim, split), for parameters some of whose elements several
    ranks hold (pieces shared by rank groups, chunks kept whole)."""
    nodes = nodes_by_name(gm)
    out: dict[int, tuple[int, DimShard]] = {}
    state = _written_in_place(gm)
    for table, dim_of in ((actions.columns, "out_dim"), (actions.rows, "in_dim")):
        for name, spec in table.items():
            if not spec.disjoint(world_size):
                m = linears[name]
                out[id(get_tensor_attr(gm, m.weight))] = (getattr(m, dim_of), spec)
    for user, path, dim, have, want in actions.narrows:
        value = get_arg(nodes[user], path)
        if have is None and value.op == "get_attr" and not want.disjoint(world_size):
            t = get_tensor_attr(gm, value.target)
            if id(t) not in state:
                out[id(t)] = (dim, want)
    return out


def _written_in_place(gm: fx.GraphModule) -> set[int]:
    """Tensor attributes the graph writes in place (a static KV cache filled with
    `index_copy_`): state, not parameters; they have no gradient to sum over replicas."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node) \
                and n.args[0].op == "get_attr" and functional_twin(n.target) is not n.target:
            out.add(id(_attr(gm, n.args[0])))
    return out


def _sum_together(g: fx.Graph, readers: dict[fx.Node, list[fx.Node]], group_name: str) -> str:
    """The parameters that sequence-sharded ops read (the norms' weights: each rank's gradient
    covers its tokens only) get one `sum_grads_over_ranks` for all of them, one all-reduce at
    the end of backward instead of one per parameter:

        mul(w, x_tokens)  ->  mul(getitem(sum_grads_over_ranks(group, w, w2, ...), 0), x_tokens)"""
    params = list(readers)
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_after(max(params, key=order.__getitem__)):
        together = g.call_function(sum_grads_over_ranks, (group_name, *params))
    together.meta[GRAD_SYNC_META] = "f"
    with g.inserting_after(together):
        for i, p in enumerate(params):
            one = g.call_function(operator.getitem, (together, i))
            one.meta.update(val=p.meta.get("val"))
            for n in readers[p]:
                n.replace_input_with(p, one)
    return together.name


def insert_grad_syncs(ctx: RewriteContext) -> tuple[str, ...]:
    """Run after the other rewrite passes (reads `ctx.slices`: the tensors sliced to this rank):

        linear(x, W_cols)  ->  linear(copy_to_region(x, group), W_cols)   (x replicated)
        get_attr W_kv      ->  sum_over_replicas(get_attr W_kv, ...)     (held by several ranks)

    Returns the names of the inserted nodes."""
    gm, actions, rank, group_name = ctx.gm, ctx.actions, ctx.rank, ctx.group_name
    g = gm.graph
    placements = actions.placements
    duplicated = _duplicated_params(gm, actions, ctx.linears, ctx.world_size)
    sliced_ids = {id(get_tensor_attr(gm, name)) for name in ctx.slices}
    rank0_adds = {add for add, _ in actions.rank0_adds}
    inserted: list[str] = []

    # values that hold this rank's slice of a parameter, or are computed from this rank's shard
    # (the k and v heads picked whole out of a fused multi-query qkv): not replicated inputs,
    # their gradients are this rank's part and get summed further back (f at the region's
    # input, sum_over_replicas on the parameter)
    local: set[fx.Node] = set()
    for n in g.nodes:
        if _gathered(n) == "sum":     # readers with partial gradients: its backward sums them
            local.add(n)
        elif n.op == "get_attr":
            if id(_attr(gm, n)) in sliced_ids:
                local.add(n)
        elif placements.get(n.name) is REPLICATE and any(
                a in local or _distributed(placements.get(a.name)) for a in n.all_input_nodes):
            local.add(n)

    def full(n: fx.Node) -> bool:
        """A replicated value, equal on every rank (gradient complete only when synced)."""
        if n in local or not _float_tensor(gm, n):
            return False
        return (placements.get(n.name) is REPLICATE or n.target in (all_reduce_sum, rank0_grad)
                or _gathered(n) == "slice")

    synced: dict[fx.Node, fx.Node] = {}
    by_tokens: dict[fx.Node, list[fx.Node]] = {}     # parameter -> region ops reading it

    def f_of(value: fx.Node) -> fx.Node:
        if value not in synced:
            with g.inserting_after(value):
                f = g.call_function(copy_to_region, (value, group_name))
            f.meta.update(val=value.meta.get("val"),
                          nn_module_stack=value.meta.get("nn_module_stack", {}))
            f.meta[GRAD_SYNC_META] = "f"
            synced[value] = f
            inserted.append(f.name)
        return synced[value]

    for n in list(g.nodes):
        if n.op != "call_function" or n in synced.values():
            continue
        narrow = n.meta.get(NARROW_META)
        if narrow is not None:
            # a replicated value narrowed to the shard a sharded op needs: slice(f(value))
            src = n.args[0] if n.target in (aten.slice.Tensor, aten.unflatten.int) else None
            if src is not None and not narrow["shared"] and full(src):
                n.replace_input_with(src, f_of(src))
            continue
        if n.name in rank0_adds or not _distributed(placements.get(n.name)):
            continue
        for a in n.all_input_nodes:
            if a.meta.get(NARROW_META) is None and full(a):
                if a.op == "get_attr" and isinstance(placements.get(n.name), SequenceShard):
                    by_tokens.setdefault(a, []).append(n)      # summed together, below
                else:
                    n.replace_input_with(a, f_of(a))
    if by_tokens:
        inserted.append(_sum_together(g, by_tokens, group_name))

    for attr in [n for n in g.nodes if n.op == "get_attr"]:
        held = duplicated.get(id(_attr(gm, attr)))
        if held is None:
            continue
        dim, spec = held
        ranges = tuple(r for r in spec.local_ranges(rank) if r[1])
        with g.inserting_after(attr):
            s = g.call_function(sum_over_replicas, (attr, group_name, dim, ranges, spec.size))
        attr.replace_all_uses_with(s, delete_user_cb=lambda u: u is not s)
        s.meta.update(nn_module_stack=attr.meta.get("nn_module_stack", {}))
        s.meta[GRAD_SYNC_META] = "replicas"
        inserted.append(s.name)
    return tuple(inserted)
