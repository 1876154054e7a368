"""Decides the sharding of a captured graph by propagating placements through it.

Every linear whose input is replicated is tried as a column-parallel source: its output is
sharded on the feature dim. That placement is pushed forward op by op (view into heads,
transpose, rotary, softmax, sdpa, activations, ...). A linear that receives a tensor sharded on
the dim it contracts becomes row-parallel and yields a partial sum; the partial sum flows through
ops that are linear in it and is all-reduced where an op needs the full value (the residual add):
the Megatron pattern, found rather than named.

When an op cannot take a sharded input (no rule, a reduction over the sharded dim, the model's
output, a head count not divisible by the world size), every source connected to it is marked
replicated with the reason and the propagation starts again. A few ops ask instead for the source
to be split differently (a fused qkv split into thirds, kv heads fewer than ranks); the source's
split is refined and the propagation starts again. The final pass records rank-independent
actions that the rewrite passes turn into this rank's graph.

The loop is bounded: at most 200 passes (then `ShardingError`), and a source refined more than
8 times is blocked. A pass that asks for refines only applies them: its failures may come from
the old splits, and are found again on the next pass if they are real. A partial sum reduced for
one user serves all its users: once a pass settles, the values it reduced are reduced eagerly
(right after they are made) and the pass runs once more.

This module holds that loop (`solve`); one pass is propagate.py, the per-op rules are the
rules_*.py modules (registry.py), the results are records.py.
"""
from __future__ import annotations

from typing import Optional

from torch import fx

from ..capture.linear import LinearMatch
from ..errors import ShardingError
from .placements import DimShard
from .propagate import Propagation
from .records import Actions, Reason, ReasonKind, Solution
from .registry import sliced_in_place

# Actions is re-exported: the rewrite passes import it from here
__all__ = ["Actions", "sliced_in_place", "solve"]


def solve(gm: fx.GraphModule, world_size: int, linears: dict[str, LinearMatch],
          overrides: Optional[dict[str, Reason]] = None, max_iterations: int = 200,
          vocab_parallel: bool = False, replicate_modules: frozenset = frozenset(),
          partial_statistics: bool = True) -> Solution:
    """Finds the sharding: runs propagation passes until no region fails or needs refining.

    A pass that asks for refined source splits only applies those (its failures may stem from
    the old splits and are found again if real). Otherwise each failed region is blocked, whole,
    except that sources seen as a single head are first tried replicated on their own.
    `partial_statistics=False` keeps every sum/mean over a sharded dim replicated (the plan
    solves that way too, to print what the partial statistics save).
    """
    blocked: dict[str, Reason] = dict(overrides or {})
    source_specs: dict[str, DimShard] = {}
    eager_reduce: set[str] = set()
    refined_count: dict[str, int] = {}
    for it in range(1, max_iterations + 1):
        p = Propagation(gm, world_size, linears, blocked, source_specs, vocab_parallel,
                        replicate_modules, frozenset(eager_reduce), partial_statistics)
        p.run()
        real = [(reg, why) for reg, why in p.failures if why.kind != ReasonKind.REFINE]
        if not real and not p.refines and not set(p.actions.reduces) <= eager_reduce:
            # a partial sum reduced for one user serves all its users: no second reduction later
            eager_reduce |= set(p.actions.reduces)
            continue
        if not real and not p.refines:
            return Solution(world_size, linears, p.actions,
                            {k: v for k, v in blocked.items() if k in linears},
                            p.uf.groups(), it, p.embedding_reasons)
        if p.refines:
            for src, spec in p.refines.items():
                refined_count[src] = refined_count.get(src, 0) + 1
                if refined_count[src] > 8:
                    blocked[src] = Reason("its split could not be settled", src, linears[src].module)
                else:
                    source_specs[src] = spec
            continue
        for region, why in real:
            group: set = set(region)
            for src in region:
                group |= p.group_of(src)
            single = {s for s in group & p.single_head if s not in blocked}
            if single and why.kind != ReasonKind.OVERRIDE:
                for src in single:
                    blocked[src] = Reason(
                        "its features form a single head, fewer than the ranks: kept whole on "
                        "every rank (MQA kv replicated, as vLLM does)", src, linears[src].module,
                        ReasonKind.SINGLE_HEAD)
                continue
            for src in group:
                blocked.setdefault(src, why)
    raise ShardingError(f"fxtp: sharding propagation did not settle in {max_iterations} passes; "
                    "please report the model (a plan override can keep the offending modules "
                    "replicated)")


