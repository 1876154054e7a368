"""The rewrite of a planned graph for one rank: the passes, in order.
"""
from __future__ import annotations

from torch import fx

from ..graph.nodes import get_tensor_attr, index_runs
from ..graph.tensors import deepcopy_graph, meta_tensors, tensor_attrs
from ..planning.plan import Plan, shapes_only
from ..runtime.group import GroupInfo
from ..runtime.state import RuntimeState
from ..runtime.weight_check import WeightDigests
from .cleanup import cleanup, own_copies
from .collectives import insert_all_reduces, keep_constant_adds_on_rank0
from .context import Pass, RewriteContext, run_passes
from .grad_sync import insert_grad_syncs
from .local_slices import insert_local_slices
from .norm_statistics import expand_norm_statistics
from .partial_means import rescale_partial_means
from .record import META_KEY, TPInfo
from .sequence import shard_sequence
from .shape_constants import rewrite_shape_constants
from .shard_params import shard_linear_params
from .vocab import gather_vocab_outputs, mask_vocab_embeddings


def record_param_slices(ctx: RewriteContext) -> dict:
    """The slice records under every name of each (possibly tied) tensor, as runs (plain ints:
    nothing in the record is on a device); the graph unchanged."""
    gm = ctx.gm
    slices = {name: (dim, index_runs(index)) for name, (dim, index) in ctx.slices.items()}
    by_id = {id(get_tensor_attr(gm, name)): rec for name, rec in slices.items()}
    named = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    out = dict(slices)
    for name, t in named.items():
        if id(t) in by_id:
            out.setdefault(name, by_id[id(t)])
    return out


# In order. Each pass is linted after it runs; the sharded-only ones are skipped at world size 1.
PASSES: tuple[Pass, ...] = (
    Pass("shard_params", shard_linear_params, "sharded_params"),
    Pass("shape_constants", rewrite_shape_constants, "rewritten_constants"),
    Pass("local_slices", insert_local_slices, "sliced_attrs"),
    Pass("vocab_embeddings", mask_vocab_embeddings),
    Pass("all_reduces", insert_all_reduces, "all_reduce_nodes"),
    Pass("vocab_outputs", gather_vocab_outputs, "all_gather_nodes"),
    Pass("rank0_adds", keep_constant_adds_on_rank0),
    Pass("sequence", shard_sequence, "sequence_nodes"),
    Pass("grad_syncs", insert_grad_syncs, "grad_sync_nodes"),
    Pass("norm_statistics", expand_norm_statistics),
    Pass("partial_means", rescale_partial_means),
    Pass("param_slices", record_param_slices, "param_slices"),
    Pass("cleanup", cleanup, sharded_only=False),
    Pass("own_tensors", own_copies, sharded_only=False),
)


def rewrite(plan: Plan, info: GroupInfo, check_weights: bool = False) -> fx.GraphModule:
    """Applies the plan's actions to a copy of the captured graph for `info.rank` (`PASSES`);
    with `check_weights`, then compares the full tensors' checksums across the ranks."""
    captured, sol = plan.captured, plan.solution
    full = {id(t): t for t in tensor_attrs(captured.gm).values()}
    # the graph is copied, the weights are not: each rank slices the captured (= the user's)
    # tensors into new local ones, then copies what it keeps whole (`own_tensors`)
    gm = deepcopy_graph(captured.gm, dict(full))
    kept = shapes_only(plan)
    digests = WeightDigests(full) if check_weights and info.world_size > 1 else None
    ctx = RewriteContext(gm=gm, actions=sol.actions, linears=sol.linears, rank=info.rank,
                         world_size=info.world_size, group_name=info.group_name,
                         model_name=plan.model_name, full=full,
                         on_read=digests.read if digests is not None else None)
    run_passes(ctx, PASSES)
    gm.recompile()
    # the weight check compares what the passes read: after all of them, one gather
    weight_check = (digests.check(tensor_attrs(captured.gm), info.group_name)
                    if digests is not None else None)
    gm.meta[META_KEY] = TPInfo(plan=kept, rank=info.rank, world_size=info.world_size,
                               group_name=info.group_name, check_weights=check_weights,
                               weight_check=weight_check, **ctx.record,
                               state=RuntimeState(unloaded=meta_tensors(gm)))
    return gm
