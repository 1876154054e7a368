"""Gives ops that mix sharded and replicated operands the local part of the replicated one.

Replicate -> Shard costs no communication: every rank already holds the whole tensor and keeps
its slice. A parameter or buffer used only there is sliced once, here (a column-parallel bias,
per-head constants); anything computed at run time gets a slice node. An operand that holds more
than it needs (kv heads replicated for GQA) is narrowed the same way.
"""
from __future__ import annotations

import torch
from torch import fx

from ..sharding import DimShard
from ..solver import Actions
from ._util import get_arg, get_tensor_attr, nodes_by_name, set_arg, set_tensor_attr
from .shard_params import slice_tensor

aten = torch.ops.aten

NARROW_META = "fxtp_narrow"   # on slice nodes made here: {"of": value name, "shared": have is set}


def _relative_ranges(have: DimShard | None, want: DimShard, rank: int) -> list[tuple[int, int]]:
    ranges = want.local_ranges(rank)
    if have is None:
        return ranges
    (hs, _), = have.local_ranges(rank)
    return [(s - hs, n) for s, n in ranges]


def insert_local_slices(gm: fx.GraphModule, actions: Actions, rank: int,
                        record: dict | None = None) -> list[str]:
    """Applies the solver's narrows; returns the names of parameters/buffers sliced in place
    (and puts name -> (dim, global indices kept) into `record` if given)."""
    nodes = nodes_by_name(gm)
    g = gm.graph
    sliced_attrs: list[str] = []
    for user_name, path, dim, have, want in actions.narrows:
        user = nodes[user_name]
        value = get_arg(user, path)
        ranges = _relative_ranges(have, want, rank)
        if value.op == "get_attr" and len(value.users) == 1 and have is None:
            full = get_tensor_attr(gm, value.target)
            index = torch.cat([torch.arange(s, s + n) for s, n in ranges])
            set_tensor_attr(gm, value.target, slice_tensor(full, dim, index))
            sliced_attrs.append(value.target)
            if record is not None:
                record[value.target] = (dim, index)
            continue
        with g.inserting_before(user):
            parts = [g.call_function(aten.slice.Tensor, (value, dim, s, s + n)) for s, n in ranges]
            local = parts[0] if len(parts) == 1 else g.call_function(aten.cat.default, (parts, dim))
        for p in {*parts, local}:
            p.meta[NARROW_META] = {"of": value.name, "shared": have is not None}
        set_arg(user, path, local)
    return sliced_attrs
