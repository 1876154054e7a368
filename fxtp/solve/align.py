"""Broadcast alignment of an op's operands, shared by every rule whose operands meet dim by dim
(pointwise ops, cat, sdpa, matmul, index_copy): all sharded dims must agree, replicated operands
are narrowed to this rank's part, and operands split differently ask for their sources to be
re-split in whole heads.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import fx

from .placements import DimShard, Origin, Partial, Sharded, as_met
from .records import Narrow, ReasonKind
from .registry import RuleContext, RuleFailure
from .shapes import arg_at, node_shape, static_int
from .splits import split_in_heads


def align(ctx: RuleContext, n: fx.Node, paths: list[tuple], out: list, forbid=(),
          allow_rank_diff=False, trailing: int = 0) -> Sharded:
    """Broadcast-aligns operands; all sharded dims must agree, replicated ones are narrowed."""
    r = len(out)
    operands = []
    placements = as_met([ctx.placement(arg_at(n, path)) for path in paths])
    for path, p in zip(paths, placements):
        node = arg_at(n, path)
        shp = node_shape(node)
        operands.append((path, node, p, shp, r - len(shp)))
    want: dict[int, DimShard] = {}
    want_of: dict[int, tuple[Sharded, int]] = {}   # output dim -> the operand it came from
    origin: dict[int, Origin] = {}
    for path, node, p, shp, off in operands:
        if isinstance(p, Partial):
            raise RuleFailure("partial sum meets a sharded value")
        if isinstance(p, Sharded):
            for d, s in p.dims:
                od = d + off
                if od in forbid or (od < 0):
                    ctx.hold_whole(p, d)
                    raise RuleFailure(f"{n.target} needs dim {d} whole but it is sharded")
                cur = want.get(od)
                if cur is None or s.parts > cur.parts:
                    want[od] = s
                    want_of[od] = (p, d)
                    if p.origin_of(d) is not None and str(shp[d]) == str(out[od]):
                        origin[od] = p.origin_of(d)
                    else:
                        origin.pop(od, None)
    for path, node, p, shp, off in operands:
        for od, s in want.items():
            d = od - off
            if d < 0 or static_int(shp[d]) == 1:
                continue
            have = p.get(d) if isinstance(p, Sharded) else None
            if have == s:
                continue
            if have is not None and not have.covers(s, ctx.world_size):
                # two sources meet split differently (a low-rank branch beside a fused qkv
                # base refined into chunks): split this operand's source like the other
                if have.size == s.size:
                    ctx.refine_or_fail(
                        p, d, lambda cur, unit: s if unit == 1 and cur == have else None)
                _align_units(ctx, p, d, have, want_of.get(od), s)
                raise RuleFailure(f"operands of {n.target} are sharded differently")
            if isinstance(p, Sharded) and have is None:
                raise RuleFailure(f"operands of {n.target} are sharded on different dims")
            if have is None and not s.outer and static_int(shp[d]) != s.size:
                raise RuleFailure(f"operand size {shp[d]} does not match the sharded dim")
            ctx.actions.narrows.append(Narrow(n.name, path, d, have, s))
    return Sharded.of(want, origin)


def _align_units(ctx: RuleContext, p: Sharded, d: int, have: DimShard,
                 wanted: Optional[tuple], s: DimShard) -> None:
    """Two operands split the same chunks at different boundaries (q heads vs kv heads
    repeated for GQA, uneven or held by groups of ranks): both sources are re-split in whole
    heads of the coarser unit, so that each rank's q heads and kv heads line up."""
    if have.chunks != s.chunks:
        return
    unit = max(math.lcm(a.unit, b.unit) for a, b in zip(have.splits, s.splits))
    refined = False
    for spec, dim in ([(p, d)] + ([wanted] if wanted else [])):
        refined |= ctx.refine(spec, dim, lambda cur, u: split_in_heads(cur, unit * u))
    if refined:
        raise RuleFailure("source split refined", ReasonKind.REFINE)
