"""Arithmetic on a source's split used by refines: re-cutting chunks at given offsets, making
elements whole on every rank, re-splitting in whole heads.

These functions only compute new `DimShard`s; the rules decide when to ask for one (through
`RuleContext.refine`) and the solver applies it on its next pass.
"""
from __future__ import annotations

import math
from typing import Optional

from .placements import ChunkSplit, DimShard


def boundaries(ds: DimShard) -> list[int]:
    """The offsets where the chunks of a split dim start, and its end."""
    out, acc = [0], 0
    for c in ds.chunks:
        acc += c
        out.append(acc)
    return out


def chunk_of(bounds: list[int], pos: int) -> int:
    """The index of the chunk holding element `pos`, given the chunks' `boundaries`."""
    return max(i for i, b in enumerate(bounds[:-1]) if b <= pos)


def fit(c: ChunkSplit) -> ChunkSplit:
    """A chunk with fewer units than pieces is held by groups of ranks, or whole by every rank
    when no group size fits."""
    if c.valid():
        return c
    g = math.gcd(c.units, c.parts) if c.size % c.unit == 0 else 1
    if g > 1:
        return ChunkSplit(c.size, g, c.stride * (c.parts // g), c.unit)
    return ChunkSplit(c.size, 1, c.parts * c.stride, 1)


def recut(cur: DimShard, cuts: list[int]) -> Optional[DimShard]:
    """The source split with extra chunk boundaries at `cuts`; new chunks keep their split."""
    bounds = []
    acc = 0
    for c in cur.splits:
        bounds.append((acc, acc + c.size, c))
        acc += c.size
    points = sorted({b for a, e, _ in bounds for b in (a, e)} | {c for c in cuts if 0 <= c <= acc})
    out = []
    for a, e in zip(points[:-1], points[1:]):
        if e <= a:
            continue
        c = next(c for s0, e0, c in bounds if s0 <= a < e0)
        unit = c.unit if (e - a) % c.unit == 0 else 1
        out.append(fit(ChunkSplit(e - a, c.parts, c.stride, unit)))
    return cur.with_splits(out)


def whole_chunks(cur: DimShard, ranges: list[tuple[int, int]]) -> Optional[DimShard]:
    """The source split with the elements in `ranges` as chunks every rank holds whole."""
    cut = recut(cur, [x for r in ranges for x in r])
    out, acc = [], 0
    for c in cut.splits:
        if any(a <= acc and acc + c.size <= e for a, e in ranges):
            c = ChunkSplit(c.size, 1, c.parts * c.stride, 1)
        out.append(c)
        acc += c.size
    return cur.with_splits(out)


def split_in_heads(cur: DimShard, head: int, alone: Optional[bool] = None) -> Optional[DimShard]:
    """The source split at whole heads of `head` features: uneven when the head count does not
    divide, groups of ranks sharing heads when there are fewer heads than pieces (as vLLM does
    for kv heads), every rank holding all of them when no group size fits. A lone single-head
    source (`alone`: `cur` is all of it; by default when it is one chunk) is left to the
    solver (kept replicated: MQA's kv projection). A single-head chunk beside others (the one
    k and the one v head of a fused multi-query qkv, cut apart by an earlier split) is held
    whole on every rank instead."""
    alone = len(cur.splits) == 1 if alone is None else alone and len(cur.splits) == 1
    out = []
    for c in cur.splits:
        if c.parts == 1:
            out.append(c)
            continue
        u = math.lcm(c.unit, head)
        if c.size % u:
            return None
        units = c.size // u
        if units >= c.parts:
            out.append(ChunkSplit(c.size, c.parts, c.stride, u))
            continue
        g = math.gcd(units, c.parts)
        if g > 1:
            out.append(ChunkSplit(c.size, g, c.stride * (c.parts // g), u))
        elif not alone or units > 1:
            out.append(ChunkSplit(c.size, 1, c.stride * c.parts, u))
        else:
            return None
    return cur.with_splits(out)


def refine_within(cur: DimShard, offset: int, length: int, make) -> Optional[DimShard]:
    """`make` applied to the part of the source split `cur` that a piece covers (`length`
    features from `offset`: x inside Mamba's x|B|C inside its in_proj output), the other
    chunks kept; None when the piece does not start and end on chunk boundaries."""
    if (offset, length) == (0, cur.size):
        return make(cur)
    bounds = boundaries(cur)
    if offset not in bounds or offset + length not in bounds:
        return None
    i, j = bounds.index(offset), bounds.index(offset + length)
    part = make(cur.with_splits(cur.splits[i:j]))
    if part is None:
        return None
    return cur.with_splits(cur.splits[:i] + part.splits + cur.splits[j:])


def why_not_whole_heads(cur: DimShard, head: int, heads: int) -> str:
    """Why a view of the split `cur` as `heads` heads of `head` features finds no split into
    whole heads: its groups (fused chunks) and their head counts, the group that fails and
    why, and the world sizes that would split it (the reason a `NotDivisibleError` gives)."""
    many = len(cur.splits) > 1
    text = f"views {cur.size} features as {heads} heads of {head}"
    if many:
        counts = [str(c.size // head) if c.size % head == 0 else f"{c.size / head:g}"
                  for c in cur.splits]
        text += f", in groups of {', '.join(counts)} heads"
    problems, fits, start = [], [], 0
    for c in cur.splits:
        subject = f"the group of features {start}-{start + c.size}" if many else "they"
        start += c.size
        if c.parts == 1:
            continue
        unit = math.lcm(c.unit, head)
        blocks = c.size // unit if c.size % unit == 0 else 0
        if not (many and blocks == 1):   # one head beside other groups: held whole by all
            fits.append(blocks)
        if c.size % head:
            problems.append(f"{subject} {'is' if many else 'are'} not whole heads")
        elif unit != head:
            problems.append(f"another view already cut {subject if many else 'them'} into "
                            f"units of {c.unit}: whole units of both sizes come in blocks of "
                            f"{unit} features, {blocks} of them, fewer than the {c.parts} ranks")
        elif blocks < c.parts and not many:
            problems.append(f"they are {blocks} head(s), fewer than the {c.parts} ranks")
    if not problems:
        problems.append(f"its shards over {cur.parts} ranks do not fall on whole heads, and "
                        "the split of no single linear layer behind it can be re-cut")
    return f"{text}: {'; '.join(problems)}; {ranks_that_fit(min(fits, default=0))}"


def ranks_that_fit(most: int, units: str = "heads") -> str:
    """The world sizes that split something of `most` whole `units` (2 to `most`)."""
    if most < 2:
        return f"no world_size above 1 splits it into whole {units}"
    sizes = "world_size 2" if most == 2 else f"a world_size from 2 to {most}"
    return f"{sizes} splits it into whole {units}"
