"""What the rewrite did to a graph, kept in `tp.meta["fxtp"]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..planning.plan import Plan
from ..runtime.state import RuntimeState
from ..runtime.weight_check import WeightCheck

META_KEY = "fxtp"


@dataclass(frozen=True)
class TPInfo:
    """What fxtp did to a graph, stored in `tp.meta["fxtp"]` for explain/draw, fxtp.load and
    tests: fixed by the rewrite. What changes as `tp` is used is in `state`."""

    plan: Plan                         # shapes only (`planning.plan.shapes_only`)
    rank: int
    world_size: int
    group_name: str
    sharded_params: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # full, local
    sliced_attrs: tuple[str, ...] = ()
    rewritten_constants: tuple[tuple[str, object, object], ...] = ()   # (node, old, new)
    all_reduce_nodes: tuple[str, ...] = ()
    all_gather_nodes: tuple[str, ...] = ()
    grad_sync_nodes: tuple[str, ...] = ()
    sequence_nodes: tuple[str, ...] = ()   # sequence parallelism's collectives (rewrite/sequence)
    # parameter/buffer name (every alias of a tied one) -> (dim, runs (global start, length) of
    # the indices this rank keeps, in order): plain ints, so nothing here is on a device
    param_slices: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    check_weights: bool = False        # transform(check_weights=): fxtp.load checks too
    weight_check: Optional[WeightCheck] = None   # what the weight check at transform compared
    state: RuntimeState = field(default_factory=RuntimeState)   # what tp keeps at run time
    # the model without its weights (capture.skeleton), set by fxtp.transform: tp.generate's
    # decode step and fxtp.save read it; None when it could not be copied (skeleton_error)
    skeleton: Optional[nn.Module] = None
    skeleton_error: str = ""
