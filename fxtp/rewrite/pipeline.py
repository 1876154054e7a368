"""The rewrite of a planned graph for one rank: the passes, in order.
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph.nodes import get_tensor_attr, index_runs
from ..graph.tensors import deepcopy_graph, meta_tensors, own_tensors, tensor_attrs
from ..planning.plan import Plan, shapes_only
from ..runtime.group import GroupInfo
from ..runtime.weight_check import WeightDigests
from .cleanup import cleanup
from .collectives import insert_all_reduces, keep_constant_adds_on_rank0
from .grad_sync import insert_grad_syncs
from .local_slices import insert_local_slices
from .record import META_KEY, TPInfo
from .shape_constants import rewrite_shape_constants
from .shard_params import shard_linear_params
from .vocab import gather_vocab_outputs, mask_vocab_embeddings


def rewrite(plan: Plan, info: GroupInfo, check_weights: bool = False) -> fx.GraphModule:
    """Applies the plan's actions to a copy of the captured graph for `info.rank`; with
    `check_weights`, compares the full tensors' checksums across the ranks (`check_weights`)."""
    captured, sol = plan.captured, plan.solution
    full = {id(t): t for t in tensor_attrs(captured.gm).values()}
    # the graph is copied, the weights are not: each rank slices the captured (= the user's)
    # tensors into new local ones, then copies what it keeps whole (`own_tensors`)
    gm = deepcopy_graph(captured.gm, dict(full))
    tp = TPInfo(plan=shapes_only(plan), rank=info.rank, world_size=info.world_size,
                group_name=info.group_name, check_weights=check_weights)
    digests = WeightDigests(full) if check_weights and info.world_size > 1 else None
    on_read = digests.read if digests is not None else None
    if info.world_size > 1:
        slices: dict[str, tuple[int, torch.Tensor]] = {}
        tp.sharded_params = shard_linear_params(gm, sol.actions, sol.linears, info.rank, slices,
                                                on_read)
        tp.rewritten_constants = rewrite_shape_constants(gm, sol.actions, info.rank)
        tp.sliced_attrs = insert_local_slices(gm, sol.actions, info.rank, slices, on_read)
        mask_vocab_embeddings(gm, sol.actions, info.rank)
        tp.all_reduce_nodes = insert_all_reduces(gm, sol.actions, info.group_name)
        tp.all_gather_nodes = gather_vocab_outputs(gm, sol.actions, info.world_size, info.group_name,
                                                   info.rank)
        keep_constant_adds_on_rank0(gm, sol.actions, info.rank)
        tp.grad_sync_nodes = insert_grad_syncs(gm, sol.actions, sol.linears, info.rank,
                                               info.world_size, info.group_name,
                                               [*tp.sharded_params, *tp.sliced_attrs])
        tp.param_slices = _with_aliases(gm, slices)
    cleanup(gm)
    own_tensors(gm, full, on_read)

    if digests is not None:
        tp.weight_check = digests.check(tensor_attrs(captured.gm), info.group_name)
    tp.unloaded = meta_tensors(gm)
    gm.meta[META_KEY] = tp
    return gm


def _with_aliases(gm: fx.GraphModule, slices: dict) -> dict:
    """The slice records under every name of each (possibly tied) tensor, as runs."""
    slices = {name: (dim, index_runs(index)) for name, (dim, index) in slices.items()}
    by_id = {id(get_tensor_attr(gm, name)): rec for name, rec in slices.items()}
    named = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    out = dict(slices)
    for name, t in named.items():
        if id(t) in by_id:
            out.setdefault(name, by_id[id(t)])
    return out
