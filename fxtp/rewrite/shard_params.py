"""Slices the weights of column- and row-parallel linears (and vocab-parallel embedding tables)
to this rank's shard, names unchanged; a tied parameter is sliced once."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import fx

from ..capture.linear import LinearMatch, tensor_key
from ..errors import ShardingError
from ..graph.nodes import get_tensor_attr, set_tensor_attr
from ..solve.solver import Actions


def shard_linear_params(gm: fx.GraphModule, actions: Actions, linears: dict[str, LinearMatch],
                        rank: int, record: dict | None = None,
                        on_read: Optional[Callable[[torch.Tensor], None]] = None
                        ) -> dict[str, tuple[tuple, tuple]]:
    """Replaces each sharded weight with its local slice; returns name -> (full, local) shape.
    `record`, if given, gets name -> (dim, global indices kept) for each sliced parameter;
    `on_read`, if given, sees each full tensor as it is read (the weight check's checksums)."""
    wanted: dict[int, tuple[str, int, object]] = {}   # tensor identity -> (name, dim, split)
    for table, dim_of in ((actions.columns, "out_dim"), (actions.rows, "in_dim")):
        for node_name, spec in table.items():
            m = linears[node_name]
            _want(wanted, gm, m.weight, getattr(m, dim_of), spec)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, spec in actions.vocab_embeddings.items():
        _want(wanted, gm, nodes[node_name].args[0].target, 0, spec)
    changed: dict[str, tuple[tuple, tuple]] = {}
    for name, dim, spec in wanted.values():
        full = get_tensor_attr(gm, name)
        if on_read is not None:
            on_read(full)
        local = slice_tensor(full, dim, spec.index(rank))
        if record is not None:
            record[name] = (dim, spec.index(rank))
        set_tensor_attr(gm, name, local)
        changed[name] = (tuple(full.shape), tuple(local.shape))
    return changed


def _want(wanted: dict, gm: fx.GraphModule, name: str, dim: int, spec) -> None:
    """Records a slice; a tied parameter (one tensor, maybe several names) is sliced once and
    must be sliced the same way by all of its users."""
    key = tensor_key(gm, name)
    if key in wanted and wanted[key][1:] != (dim, spec):
        raise ShardingError(f"parameter {name} is used by ops that need different slices "
                        f"({wanted[key][1:]} vs {(dim, spec)}); keep one of them replicated")
    wanted.setdefault(key, (name, dim, spec))


def slice_tensor(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` restricted to `index` along `dim` (owns its storage)."""
    with torch.no_grad():
        return t.detach().index_select(dim, index.to(t.device)).contiguous()
