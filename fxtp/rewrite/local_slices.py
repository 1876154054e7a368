"""Gives ops that mix sharded and replicated operands the local part of the replicated one.

Replicate -> Shard costs no communication: every rank already holds the whole tensor and keeps
its slice. A parameter or buffer used only there is sliced once, here (a column-parallel bias,
per-head constants); anything computed at run time gets a slice node. An operand that holds more
than it needs (kv heads replicated for GQA) is narrowed the same way. A dim that is a dynamic
outer factor times a sharded block (BLOOM's ALiBi bias, `[b * heads, 1, s]`) is unflattened,
sliced on the block and flattened back.
"""
from __future__ import annotations

import torch

from ..graph.nodes import (
    get_arg,
    get_tensor_attr,
    nodes_by_name,
    runs_index,
    set_arg,
    set_tensor_attr,
)
from ..solve.placements import DimShard
from ..solve.solver import sliced_in_place
from .context import RewriteContext
from .shard_params import slice_tensor

aten = torch.ops.aten

NARROW_META = "fxtp_narrow"   # on slice nodes made here: {"of": value name, "shared": have is set}


def relative_ranges(have: DimShard | None, want: DimShard, rank: int) -> list[tuple[int, int]]:
    """The (start, length) runs, in positions of what this rank holds (`have`, or the whole dim
    when None), of the elements `want` gives this rank."""
    wanted = want.index(rank).tolist()
    if have is None:
        positions = wanted
    else:
        where = {g: i for i, g in enumerate(have.index(rank).tolist())}
        positions = [where[g] for g in wanted]
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def insert_local_slices(ctx: RewriteContext) -> tuple[str, ...]:
    """Applies the solver's narrows, a replicated operand cut to what a sharded op needs:

        add(h_shard, bias)   ->  add(h_shard, bias[this rank's part])     (sliced in place)
        mul(q_shard, x)      ->  mul(q_shard, slice(x, dim, start, end))  (a run-time value)

    Returns the names of parameters/buffers sliced in place (each also into `ctx.slices` with
    (dim, global indices kept); `ctx.on_read` sees each full tensor as it is read)."""
    gm, actions, rank = ctx.gm, ctx.actions, ctx.rank
    nodes = nodes_by_name(gm)
    g = gm.graph
    sliced_attrs: list[str] = []
    for user_name, path, dim, have, want in actions.narrows:
        user = nodes[user_name]
        value = get_arg(user, path)
        ranges = relative_ranges(have, want, rank)
        if sliced_in_place(value, have, want):
            full = get_tensor_attr(gm, value.target)
            if ctx.on_read is not None:
                ctx.on_read(full)
            index = runs_index(ranges)
            set_tensor_attr(gm, value.target, slice_tensor(full, dim, index))
            sliced_attrs.append(value.target)
            ctx.slices[value.target] = (dim, index)
            continue
        with g.inserting_before(user):
            src, at = value, dim
            if want.outer:   # [outer * block] -> [outer, block]: slice the block
                block = have.local_size_of(rank) if have is not None else want.size
                src, at = g.call_function(aten.unflatten.int, (value, dim, [-1, block])), dim + 1
            parts = [g.call_function(aten.slice.Tensor, (src, at, s, s + n)) for s, n in ranges]
            local = parts[0] if len(parts) == 1 else g.call_function(aten.cat.default, (parts, at))
            if want.outer:
                local = g.call_function(aten.flatten.using_ints, (local, dim, dim + 1))
        for p in {*parts, local, src} - {value}:
            p.meta[NARROW_META] = {"of": value.name, "shared": have is not None}
            p.meta["nn_module_stack"] = user.meta.get("nn_module_stack", {})   # the user's layer
        set_arg(user, path, local)
    return tuple(sliced_attrs)
