"""What the rewrite did to a graph, kept in `tp.meta["fxtp"]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..planning.plan import Plan

META_KEY = "fxtp"


@dataclass
class TPInfo:
    """What fxtp did to a graph; stored in `tp.meta["fxtp"]` for explain/draw and tests."""

    plan: Plan
    rank: int
    world_size: int
    group_name: str
    sharded_params: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)
    sliced_attrs: list[str] = field(default_factory=list)
    rewritten_constants: list[tuple[str, object, int]] = field(default_factory=list)
    all_reduce_nodes: list[str] = field(default_factory=list)
    all_gather_nodes: list[str] = field(default_factory=list)
    grad_sync_nodes: list[str] = field(default_factory=list)
    # parameter/buffer name (every alias of a tied one) -> (dim, runs (global start, length) of
    # the indices this rank keeps, in order): plain ints, so nothing here is on a device
    param_slices: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    dropout_disabled: bool = False     # set by fxtp.for_training(tp, disable_dropout=True)
    lora_fold: Any = None              # passes.lora.FoldState while LoRA is folded
    lora_last_fold: Any = None         # the latest FoldState: its two graphs serve later folds
    # parameters/buffers still on the meta device (a model built on meta, before fxtp.load)
    unloaded: tuple[str, ...] = ()
    check_weights: bool = False        # transform(check_weights=): fxtp.load checks too
    check_inputs: bool = False         # transform(check_inputs=): every call compares inputs
    weight_check: Any = None           # what the weight check at transform compared
