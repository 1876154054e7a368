"""Vocab-parallel embedding lookups and gathered vocab-parallel logits (plan option).

Each rank keeps rows [start, end) of the embedding table. A lookup masks the ids outside that
range, looks the rest up in the local rows and zeroes the masked rows: the result is a partial
sum that the solver all-reduces where the full value is needed (Megatron's
VocabParallelEmbedding). Logits sharded on the vocab dim are all-gathered where they leave the
model, so the output equals the untouched model's.
"""
from __future__ import annotations

import torch
from torch import fx

from ..capture.linear import module_path
from ..graph.nodes import nodes_by_name
from ..runtime.collectives import all_gather_dim0
from .context import RewriteContext

aten = torch.ops.aten


def mask_vocab_embeddings(ctx: RewriteContext) -> None:
    """Rewrites embedding(W, ids) for this rank's rows of W (W itself is sliced elsewhere):

        emb = embedding(W, ids)  ->  out = ids outside [start, end); local = ids - start, 0 there
                                     emb = masked_fill(embedding(W, local), out, 0.0)

    The lookup moves to a new node and the original node becomes the masking of its result, so
    the node the solver named (whose partial sum later passes reduce, add constants to, ...)
    is the masked value."""
    gm, rank = ctx.gm, ctx.rank
    nodes = nodes_by_name(gm)
    g = gm.graph
    for name, spec in ctx.actions.vocab_embeddings.items():
        emb = nodes[name]
        ids = emb.args[1]
        (start, length), = spec.local_ranges(rank)
        with g.inserting_before(emb):
            _assert_in_vocab(g, ids, spec.size, module_path(emb) or emb.name)
            below = g.call_function(aten.lt.Scalar, (ids, start))
            above = g.call_function(aten.ge.Scalar, (ids, start + length))
            outside = g.call_function(aten.logical_or.default, (below, above))
            shifted = g.call_function(aten.sub.Tensor, (ids, start))
            local_ids = g.call_function(aten.masked_fill.Scalar, (shifted, outside, 0))
            lookup = g.call_function(emb.target, (emb.args[0], local_ids, *emb.args[2:]),
                                     dict(emb.kwargs))
            keep = g.call_function(aten.unsqueeze.default, (outside, -1))
        lookup.meta["val"] = emb.meta.get("val")
        lookup.meta["nn_module_stack"] = emb.meta.get("nn_module_stack", {})
        emb.target, emb.args, emb.kwargs = aten.masked_fill.Scalar, (lookup, keep, 0.0), {}


def _assert_in_vocab(g: fx.Graph, ids: fx.Node, vocab: int, where: str) -> None:
    """ids outside [0, vocab) would be masked to zero rows on every rank, and the lookup
    would silently return zeros where the model's embedding raises IndexError: assert on the
    device instead (`_assert_async`: no host sync; on a GPU a device-side assert, as the
    model's own out-of-range lookup gives)."""
    low = g.call_function(aten.ge.Scalar, (ids, 0))
    high = g.call_function(aten.lt.Scalar, (ids, vocab))
    inside = g.call_function(aten.all.default, (g.call_function(aten.logical_and.default,
                                                                (low, high)),))
    g.call_function(aten._assert_async.msg, (inside, (
        f"fxtp: token ids outside [0, {vocab}) reached the vocab-parallel embedding {where} "
        f"(input {ids.name}); the model's own embedding raises IndexError for them. Pass ids "
        "below the vocabulary size (check the tokenizer matches the model's config).")))


def gather_vocab_outputs(ctx: RewriteContext) -> tuple[str, ...]:
    """All-gathers each vocab-sharded output along its vocab dim for the users that need it:

        out(logits)  ->  out(movedim(all_gather_dim0(clone(movedim(logits, d, 0))), 0, d))

    Returns the gather nodes."""
    gm, world_size, group_name, rank = ctx.gm, ctx.world_size, ctx.group_name, ctx.rank
    nodes = nodes_by_name(gm)
    g = gm.graph
    out = []
    for value_name, dim, user_names in ctx.actions.gathers:
        value = nodes[value_name]
        with g.inserting_after(value):
            front = g.call_function(aten.movedim.int, (value, dim, 0))
        with g.inserting_after(front):
            contiguous = g.call_function(aten.clone.default, (front,),
                                         {"memory_format": torch.contiguous_format})
        with g.inserting_after(contiguous):
            gathered = g.call_function(all_gather_dim0, (contiguous, world_size, group_name, rank))
        with g.inserting_after(gathered):
            back = g.call_function(aten.movedim.int, (gathered, 0, dim))
        gathered.meta["fxtp_collective"] = {"op": "all_gather", "of": value_name}
        gathered.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
        back.meta["val"] = value.meta.get("val")
        for u in user_names:
            nodes[u].replace_input_with(value, back)
        out.append(gathered.name)
    return tuple(out)
