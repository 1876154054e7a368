"""Slices the weights of column- and row-parallel linears (and vocab-parallel embedding tables)
to this rank's shard, names unchanged; a tied parameter is sliced once."""
from __future__ import annotations

import torch
from torch import fx

from ..capture.linear import tensor_key
from ..errors import ShardingError
from ..graph.nodes import get_tensor_attr, set_tensor_attr
from .context import RewriteContext


def shard_linear_params(ctx: RewriteContext) -> dict[str, tuple[tuple, tuple]]:
    """Replaces each sharded weight with its local slice, same name (the graph is unchanged):

        linear(x, W)          ->  linear(x, W[this rank's rows or columns])
        embedding(E, ids)     ->  embedding(E[this rank's rows], ids)   (vocab-parallel)

    Returns name -> (full, local) shape; puts name -> (dim, global indices kept) into
    `ctx.slices`; `ctx.on_read` sees each full tensor as it is read."""
    gm, actions, linears, rank = ctx.gm, ctx.actions, ctx.linears, ctx.rank
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
        if ctx.on_read is not None:
            ctx.on_read(full)
        local = slice_tensor(full, dim, spec.index(rank))
        ctx.slices[name] = (dim, spec.index(rank))
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
