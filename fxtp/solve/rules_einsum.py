"""The rule for `einsum`: each letter of the equation names a dim, so a sharded dim follows
its letter to the output, operands without the letter broadcast, and replicated operands with
it are cut to this rank's part (Mamba-2's chunked scan over heads: `bclhn,bcshn->bclhs`).
"""
from __future__ import annotations

from torch import fx

from ..graph.ops import aten
from .placements import DimShard, Partial, Sharded, as_met
from .records import Narrow
from .registry import SHARDED_RULES, RuleContext, RuleFailure
from .shapes import node_shape, sharded_or_replicate


def letters_of(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """The letters naming each operand's dims and the output's, `...` spelled out as one
    letter per broadcast dim (aligned from the right, as einsum broadcasts them)."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise RuleFailure("einsum with a different number of terms and operands")
    spare = [chr(c) for c in range(0x3b1, 0x3c9) if chr(c) not in equation]   # Greek letters
    widest = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t),
                 default=0)
    ellipsis = spare[:widest]

    def spelled(term: str, rank: int) -> str:
        if "..." not in term:
            return term
        k = rank - len(term.replace("...", ""))
        return term.replace("...", "".join(ellipsis[widest - k:]))

    operands = [spelled(t, r) for t, r in zip(terms, ranks)]
    if "->" not in equation:   # implicit output: the letters seen once, sorted
        seen = "".join(operands)
        out = "".join(ellipsis) + "".join(sorted(c for c in set(seen)
                                                  if seen.count(c) == 1 and c not in ellipsis))
    else:
        out = spelled(rhs, widest + len(rhs.replace("...", "")))
    return operands, out


@SHARDED_RULES.rule(aten.einsum.default)
def einsum(ctx: RuleContext, n: fx.Node) -> Sharded:
    """Each sharded letter takes the finest split any operand has; operands holding more of
    it (replicated, or whole on every rank) are narrowed. A contracted sharded letter that is
    a piece of a fused source asks for that piece whole on every rank (Mamba-2's B and C
    with fewer groups than ranks); otherwise the einsum fails."""
    tensors = list(n.args[1])
    shapes = [node_shape(t) for t in tensors]
    if any(s is None for s in shapes):
        raise RuleFailure("einsum of a non-tensor")
    terms, out = letters_of(n.args[0], [len(s) for s in shapes])
    placements = as_met([ctx.placement(t) for t in tensors])
    want: dict[str, DimShard] = {}
    for p, term in zip(placements, terms):
        if isinstance(p, Partial):
            raise RuleFailure("einsum of a partial sum")
        if not isinstance(p, Sharded):
            continue
        for d, ds in p.dims:
            letter = term[d]
            if letter not in out:
                if all(c.parts == 1 for c in ds.splits):
                    continue   # every rank holds all of it: contracted locally
                ctx.hold_whole(p, d)
                raise RuleFailure(f"einsum contracts the sharded dim {letter!r}")
            if letter not in want or ds.parts > want[letter].parts:
                want[letter] = ds
    for i, (p, term, shape) in enumerate(zip(placements, terms, shapes)):
        for letter, ds in want.items():
            d = term.find(letter)
            if d < 0 or str(shape[d]) == "1":
                continue
            have = p.get(d) if isinstance(p, Sharded) else None
            if have is not None and have.covers(ds, ctx.world_size) and \
                    ds.covers(have, ctx.world_size):
                continue   # the same elements on every rank
            if isinstance(p, Sharded) and have is None:
                raise RuleFailure(f"einsum operands are sharded on different dims ({letter!r})")
            if have is not None and not have.covers(ds, ctx.world_size):
                raise RuleFailure(f"einsum operands are sharded differently on {letter!r}")
            ctx.actions.narrows.append(Narrow(n.name, (1, i), d, have, ds))
    return sharded_or_replicate({out.index(letter): ds for letter, ds in want.items()}, {})
