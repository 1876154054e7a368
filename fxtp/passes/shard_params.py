"""Slices the weights of column- and row-parallel linears to this rank's shard, names unchanged."""
from __future__ import annotations

import torch
from torch import fx

from ..patterns.linear import LinearMatch
from ..solver import Actions
from ._util import get_tensor_attr, set_tensor_attr


def shard_linear_params(gm: fx.GraphModule, actions: Actions, linears: dict[str, LinearMatch],
                        rank: int) -> dict[str, tuple[tuple, tuple]]:
    """Replaces each sharded weight with its local slice; returns name -> (full, local) shape."""
    changed: dict[str, tuple[tuple, tuple]] = {}
    for table, dim_of in ((actions.columns, "out_dim"), (actions.rows, "in_dim")):
        for node_name, spec in table.items():
            m = linears[node_name]
            dim = getattr(m, dim_of)
            full = get_tensor_attr(gm, m.weight)
            local = slice_tensor(full, dim, spec.index(rank))
            set_tensor_attr(gm, m.weight, local)
            changed[m.weight] = (tuple(full.shape), tuple(local.shape))
    return changed


def slice_tensor(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` restricted to `index` along `dim` (owns its storage)."""
    with torch.no_grad():
        return t.detach().index_select(dim, index.to(t.device)).contiguous()
