"""Low-rank branches (LoRA) recognised from the placements, not from module names: a linear on
a partial sum that joins another partial sum downstream stays partial (the branch shares the
base's all-reduce), and a narrow branch whose partial sum would be all-reduced only to meet a
sharded value is better kept whole.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..capture.linear import LinearMatch, module_path
from ..graph.ops import (
    DROPOUT,
    PARTIAL_SHAPE_OPS,
    aten,
    dropout_active,
    functional_twin,
)
from .placements import Partial
from .records import Actions, Failure, Reason, ReasonKind


def joins_partial_sum(n: fx.Node, pl: dict[fx.Node, Any]) -> bool:
    """True when `n`'s output, kept a partial sum, reaches (through ops linear in it, one
    user each) an add whose other operand is already a partial sum (`pl`: the placements so
    far): then it can share that sum's all-reduce instead of needing its own."""
    cur = n
    for _ in range(16):
        if len(cur.users) != 1:
            return False
        u = next(iter(cur.users))
        t = functional_twin(u.target) if u.op == "call_function" else None
        if t in (aten.add.Tensor, aten.sub.Tensor):
            others = [a for a in u.args if isinstance(a, fx.Node) and a is not cur]
            return len(others) == 1 and isinstance(pl.get(others[0]), Partial)
        scalar_mul = t in (aten.mul.Tensor, aten.div.Tensor) and not any(
            isinstance(a, fx.Node) and a is not cur for a in u.args)
        if not (t in PARTIAL_SHAPE_OPS or scalar_mul
                or (t in DROPOUT and not dropout_active(u))):
            return False
        cur = u
    return False


def bottleneck_failures(n: fx.Node, ins: list, pl: dict[fx.Node, Any], actions: Actions,
                        regions: dict[fx.Node, frozenset],
                        linears: dict[str, LinearMatch]) -> list[Failure]:
    """A partial sum about to be all-reduced only to meet a sharded value at `n`: if it comes
    from a row-parallel linear fed by narrower column sources (x -> A -> B, a low-rank
    branch beside a column-parallel base), those sources are better replicated. Then B
    becomes column-parallel beside the base and no all-reduce is needed (LoRA's A stays
    whole, B is split like the base). Returns those sources as failures."""
    out: list[Failure] = []
    for a in ins:
        if not isinstance(pl.get(a), Partial):
            continue
        row = a
        while row.name not in actions.rows and row.op == "call_function" and row.args \
                and isinstance(row.args[0], fx.Node) and isinstance(pl.get(row.args[0]), Partial):
            row = row.args[0]
        if row.name not in actions.rows:
            continue
        sources = regions.get(row, frozenset())
        features = linears[row.name].out_features
        if sources and all(linears[s].out_features < features for s in sources):
            module = linears[row.name].module
            out.append(Failure(sources, Reason(
                f"low-rank branch: its {module} output would be all-reduced only to meet a "
                f"sharded value at {n.name}; kept whole so that {module} is split like the "
                "value it joins", row.name, module_path(row), ReasonKind.BOTTLENECK)))
    return out
