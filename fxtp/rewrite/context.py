"""The contract of the rewrite passes: one context that every pass reads and edits, one signature.

A pass is `fn(ctx) -> piece`: it edits `ctx.gm` (its graph, the tensors it holds) and returns
its piece of the record (`TPInfo`), or None. `pipeline.PASSES` lists the passes in order, with
the record field each piece goes into; `run_passes` runs them and lints the graph after each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx

from ..capture.linear import LinearMatch
from ..errors import RewriteError
from ..solve.solver import Actions


@dataclass
class RewriteContext:
    """What the passes share while rewriting one rank's copy of the captured graph."""

    gm: fx.GraphModule                     # this rank's graph, edited in place
    actions: Actions                       # the plan's rank-independent instructions
    linears: dict[str, LinearMatch]        # matmul node -> its linear
    rank: int
    world_size: int
    group_name: str
    model_name: str                        # for error messages
    # the captured (the user's) tensors by identity: what the rewrite reads and must not keep
    full: dict[int, torch.Tensor] = field(default_factory=dict)
    # parameter/buffer name -> (dim, global indices kept): every tensor sliced to this rank
    slices: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # sees each full tensor as a pass reads it (the weight check's checksums), or None
    on_read: Optional[Callable[[torch.Tensor], None]] = None
    # the record being built: TPInfo field -> the piece a pass returned
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """One step of the rewrite. `record`: the TPInfo field its result goes into (None: the pass
    returns nothing). `sharded_only`: skipped at world size 1, where nothing is sharded."""

    name: str
    fn: Callable[[RewriteContext], Any]
    record: Optional[str] = None
    sharded_only: bool = True


def run_passes(ctx: RewriteContext, passes: tuple[Pass, ...]) -> None:
    """Runs `passes` in order on `ctx.gm`, storing their pieces in `ctx.record`; after each
    one checks the graph (`fx.Graph.lint`: nodes owned by the graph and in topological order,
    unique names, targets present on the module) and raises `RewriteError` naming the pass
    that broke it."""
    for p in passes:
        if p.sharded_only and ctx.world_size == 1:
            continue
        piece = p.fn(ctx)
        if p.record is not None:
            ctx.record[p.record] = piece
        try:
            ctx.gm.graph.lint()
        except Exception as e:
            raise RewriteError(
                f"fxtp: the rewrite pass {p.name!r} left the graph of {ctx.model_name} (rank "
                f"{ctx.rank} of {ctx.world_size}) malformed: {_what(ctx.gm, e)}. This is a "
                "bug in fxtp; please report it with the model and its fxtp.plan.") from e


def _what(gm: fx.GraphModule, e: Exception) -> str:
    """What `fx.Graph.lint` found, in one line (its message ends with the whole graph); a node
    still using an erased one (lint says 'used before it has been defined') is named as such."""
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if getattr(a, "_erased", False):
                return f"node {n.name} uses {a.name}, which was erased from the graph"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
