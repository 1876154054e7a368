"""Finds LoRA branches in a graph, from its structure, never from names.

A branch is an `add` whose operands are a linear's output (possibly plus a bias, possibly a
partial sum) and `scale * B(A(x'))`, where A and B are linears without other users and x' is the
base linear's own input (the same node, looking through Megatron's `copy_to_region`, identity
ops and inactive dropout). The solver reports them, and `rewrite/lora_fold.py` folds them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from ..graph.ops import DROPOUT, IDENTITY, VIEWS, dropout_active
from ..runtime.collectives import GRAD_SYNC_OPS, grad_only_add
from ..runtime.sequence import rank0_grad
from .linear import LinearMatch, module_path

aten = torch.ops.aten
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_MULS = {aten.mul.Tensor, aten.mul_.Tensor}
_BIAS_ADDS = {aten.add.Tensor, grad_only_add}


@dataclass(frozen=True)
class LoraBranch:
    add: str            # the add joining base and branch
    base: str           # base linear node
    a: str              # A linear node
    b: str              # B linear node
    scale: float
    module: str


def _through(n: object) -> object:
    """Looks through ops that do not change values (identity, views, inactive dropout, f,
    sequence parallelism's `rank0_grad`)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and (
            n.target in IDENTITY or n.target in GRAD_SYNC_OPS or n.target in VIEWS
            or n.target is rank0_grad
            or (n.target in DROPOUT and not dropout_active(n))):
        n = n.args[0]
    return n


def _linear_of(n: object, linears: dict[str, LinearMatch]) -> Optional[fx.Node]:
    """The linear producing `n`, looking through views and identity ops."""
    while isinstance(n, fx.Node) and n.name not in linears and n.op == "call_function" and (
            n.target in IDENTITY or n.target in VIEWS or n.target in DROPOUT) and n.args:
        n = n.args[0]
    return n if isinstance(n, fx.Node) and n.name in linears else None


def _input(linear: fx.Node) -> object:
    return linear.args[1] if linear.target == aten.addmm.default else linear.args[0]


def find_lora_branches(gm: fx.GraphModule, linears: dict[str, LinearMatch]) -> list[LoraBranch]:
    """Every `base(x) + scale * B(A(x))` in the graph."""
    out = []
    for add in gm.graph.nodes:
        if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2:
            continue
        for side in (0, 1):
            base_val, branch = add.args[side], add.args[1 - side]
            hit = match_branch(base_val, branch, linears)
            if hit is not None:
                base, a, b, scale = hit
                out.append(LoraBranch(add.name, base.name, a.name, b.name, scale,
                                      module_path(base)))
                break
    return out


def match_branch(base_val, branch, linears):
    if not isinstance(branch, fx.Node) or branch.target not in _MULS:
        return None
    scales = [x for x in branch.args if isinstance(x, numbers.Number)]
    tensors = [x for x in branch.args if isinstance(x, fx.Node)]
    if len(scales) != 1 or len(tensors) != 1:
        return None
    b = _linear_of(tensors[0], linears)
    a = _linear_of(_through(_input(b)), linears) if b is not None else None
    if a is None or len(a.users) != 1 or len(b.users) != 1:
        return None
    # the base: a linear, maybe followed by its bias add
    base = base_val
    while isinstance(base, fx.Node) and base.name not in linears and base.op == "call_function" \
            and (base.target in _BIAS_ADDS or base.target in VIEWS) \
            and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if not isinstance(base, fx.Node) or base.name not in linears or base in (a, b):
        return None
    if _through(_input(base)) is not _through(_input(a)):
        return None
    return base, a, b, float(scales[0])
