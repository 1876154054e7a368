"""Rules for ops that receive a partial sum (the output of a row-parallel linear): the ops linear
in it keep it partial, so the all-reduce moves past them and parallel branches can share one.
An op without a rule here (DECLINED) gets the full value: the sum is all-reduced before it.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..graph.ops import (
    DROPOUT,
    DTYPE_OF,
    NO_OUTPUT,
    PARTIAL_LINEAR_IN_FIRST,
    PARTIAL_SHAPE_OPS,
    aten,
    dropout_active,
)
from .placements import REPLICATE, Partial, Sharded
from .records import Rank0Add
from .registry import DECLINED, PARTIAL_RULES, RuleContext
from .shapes import node_shape

rule = PARTIAL_RULES.rule


def _kinds(ctx: RuleContext, n: fx.Node) -> list[type]:
    """The placement types of `n`'s input nodes."""
    return [type(ctx.placement(a)) for a in n.all_input_nodes]


def _tensors(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.args if isinstance(a, fx.Node)]


def _first_is_partial(ctx: RuleContext, n: fx.Node) -> bool:
    return isinstance(ctx.placement(n.args[0]), Partial)


@rule(*NO_OUTPUT)
def metadata(ctx: RuleContext, n: fx.Node) -> Any:
    """Metadata checks: dtype/device hold for a partial sum too."""
    return REPLICATE


@rule(*PARTIAL_SHAPE_OPS)
def shape_op(ctx: RuleContext, n: fx.Node) -> Any:
    if len(_tensors(n)) == 1 and Sharded not in _kinds(ctx, n):
        return Partial()
    if n.target in DTYPE_OF and _first_is_partial(ctx, n) and Sharded not in _kinds(ctx, n):
        return Partial()     # x.type_as(other): other gives its dtype only
    return DECLINED


@rule(*DROPOUT)
def inactive_dropout(ctx: RuleContext, n: fx.Node) -> Any:
    return DECLINED if dropout_active(n) else shape_op(ctx, n)


@rule(aten.sub.Tensor)
def sum_of_partials(ctx: RuleContext, n: fx.Node) -> Any:
    """Two partial sums added or subtracted: still a partial sum."""
    if len(_tensors(n)) == 2 and all(k is Partial for k in _kinds(ctx, n)):
        return Partial()
    return DECLINED


@rule(aten.add.Tensor)
def add(ctx: RuleContext, n: fx.Node) -> Any:
    out = sum_of_partials(ctx, n)
    if out is not DECLINED:
        return out
    tensors, kinds = _tensors(n), _kinds(ctx, n)
    if len(tensors) == 2 and kinds.count(Partial) == 1 and Sharded not in kinds and not n.kwargs:
        # a constant (bias) added to a partial sum: rank 0 adds it, the others skip the add,
        # so parallel branches (attention + MLP) still share one all-reduce
        part, const = (tensors[0], tensors[1]) if isinstance(ctx.placement(tensors[0]), Partial) \
            else (tensors[1], tensors[0])
        if const.op == "get_attr" and str(node_shape(part)) == str(node_shape(n)):
            ctx.actions.rank0_adds.append(Rank0Add(n.name, part.name))
            return Partial()
    return DECLINED


@rule(*PARTIAL_LINEAR_IN_FIRST)
def linear_in_first(ctx: RuleContext, n: fx.Node) -> Any:
    """Gathering rows, summing or slicing a partial sum commutes with the all-reduce."""
    kinds = _kinds(ctx, n)
    if Sharded not in kinds and kinds.count(Partial) == 1 and _first_is_partial(ctx, n):
        return Partial()
    return DECLINED


@rule(aten.mul.Tensor, aten.neg.default)
def scaled(ctx: RuleContext, n: fx.Node) -> Any:
    """A partial sum times a full value (or negated)."""
    kinds = _kinds(ctx, n)
    if Sharded not in kinds and kinds.count(Partial) == 1:
        return Partial()
    return DECLINED


@rule(aten.div.Tensor)
def divided(ctx: RuleContext, n: fx.Node) -> Any:
    """A partial sum divided by a full value (as the numerator only)."""
    if _first_is_partial(ctx, n):
        return scaled(ctx, n)
    return DECLINED
