"""Placements of a tensor across the ranks of a tensor-parallel group.

A value in the graph is either replicated (every rank holds all of it), partial (every rank
holds a summand; the true value is the sum over ranks) or sharded along one or more dimensions.
With sequence parallelism, a value of the replicated region may instead be split along the
sequence (:class:`SequenceShard`, decided after the other placements: solve/sequence.py).

A sharded dimension is described by :class:`DimShard`. It generalises DTensor's ``Shard(dim)``
in the two ways tensor parallelism of transformers needs:

* ``chunks``: the dimension is made of independent segments (fused q|k|v, gate|up) and each
  segment is split separately, so every rank takes its heads from every segment.
* ``parts`` / ``stride``: the number of distinct pieces may be smaller than the world size
  (GQA/MQA with fewer kv heads than ranks): rank ``r`` holds piece ``(r // stride) % parts`` and
  ranks that share a piece hold the same data, as vLLM replicates kv heads.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch


@dataclass(frozen=True)
class ChunkSplit:
    """How one segment (chunk) of a dimension is split: into `parts` pieces of whole `unit`s
    (heads), as evenly as the units allow (the first pieces get one unit more when the count
    does not divide); rank ``r`` holds piece ``(r // stride) % parts``. ``parts == 1`` keeps the
    chunk whole on every rank (the single kv head of a fused multi-query qkv)."""

    size: int
    parts: int
    stride: int = 1
    unit: int = 1

    @property
    def units(self) -> int:
        return self.size // self.unit

    def piece(self, rank: int) -> int:
        return (rank // self.stride) % self.parts

    def counts(self) -> list[int]:
        """Units held by each piece, in piece order."""
        q, r = divmod(self.units, self.parts)
        return [q + (1 if p < r else 0) for p in range(self.parts)]

    def range(self, rank: int) -> tuple[int, int]:
        """(start, length) inside the chunk of what `rank` holds."""
        counts, p = self.counts(), self.piece(rank)
        return sum(counts[:p]) * self.unit, counts[p] * self.unit

    def valid(self) -> bool:
        return self.parts >= 1 and self.size % self.unit == 0 and self.units >= self.parts

    def even(self) -> bool:
        return self.units % self.parts == 0


class DimShard:
    """How one dimension of a tensor is split over the ranks: a concatenation of chunks, each
    split on its own (:class:`ChunkSplit`).

    ``DimShard(parts, stride, chunks, unit)`` splits every chunk alike (the common case);
    ``DimShard(splits=...)`` gives each chunk its own split. ``outer=True`` marks a dim that is
    a dynamic outer factor times the split block (BLOOM's ``[batch * heads, s, d]``): the block
    repeats for every outer index and each rank holds its part of every block.
    """

    __slots__ = ("splits", "outer")

    def __init__(self, parts: int = 1, stride: int = 1, chunks: tuple = (), unit: int = 1, *,
                 splits: Optional[tuple[ChunkSplit, ...]] = None, outer: bool = False):
        if splits is None:
            splits = tuple(ChunkSplit(int(c), parts, stride, unit) for c in chunks)
        object.__setattr__(self, "splits", tuple(splits))
        object.__setattr__(self, "outer", bool(outer))

    def __setattr__(self, name, value):
        raise AttributeError("DimShard is immutable")

    def _key(self):
        return self.splits, self.outer

    def __eq__(self, other) -> bool:
        return isinstance(other, DimShard) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self.uniform():
            c = self.splits[0]
            args = f"{c.parts}, {c.stride}, {self.chunks}" + (f", unit={c.unit}" if c.unit != 1 else "")
        else:
            args = f"splits={self.splits}"
        return f"DimShard({args}{', outer=True' if self.outer else ''})"

    def __reduce__(self):
        return (_rebuild_dimshard, (self.splits, self.outer))

    # -- shape of the split -------------------------------------------------------------
    def with_splits(self, splits, outer: Optional[bool] = None) -> "DimShard":
        return DimShard(splits=tuple(splits), outer=self.outer if outer is None else outer)

    def uniform(self) -> bool:
        """Every chunk split alike (same parts, stride and unit)."""
        first = self.splits[0]
        return all((c.parts, c.stride, c.unit) == (first.parts, first.stride, first.unit)
                   for c in self.splits)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(c.size for c in self.splits)

    @property
    def parts(self) -> int:
        """The most pieces any chunk is split into."""
        return max(c.parts for c in self.splits)

    @property
    def stride(self) -> int:
        return max(self.splits, key=lambda c: c.parts).stride

    @property
    def size(self) -> int:
        return sum(self.chunks)

    def piece(self, rank: int) -> int:
        """The piece `rank` holds of the most finely split chunk."""
        return max(self.splits, key=lambda c: c.parts).piece(rank)

    def local_ranges(self, rank: int) -> list[tuple[int, int]]:
        """(start, length) of every global range this rank holds, in order."""
        out, base = [], 0
        for c in self.splits:
            s, n = c.range(rank)
            out.append((base + s, n))
            base += c.size
        return out

    def local_size_of(self, rank: int) -> int:
        return sum(n for _, n in self.local_ranges(rank))

    @property
    def local_size(self) -> int:
        """Rank 0's local size: the largest (first pieces take the extra units)."""
        return self.local_size_of(0)

    def local_sizes(self, world_size: int) -> tuple[int, ...]:
        return tuple(self.local_size_of(r) for r in range(world_size))

    def even(self) -> bool:
        return all(c.even() for c in self.splits)

    def disjoint(self, world_size: int) -> bool:
        """Every element is held by exactly one rank (a row-parallel sum counts it once)."""
        return all(c.parts == world_size and c.stride == 1 for c in self.splits)

    def valid(self) -> bool:
        return all(c.valid() for c in self.splits)

    def index(self, rank: int) -> torch.Tensor:
        """The global indices this rank holds along the dimension."""
        return torch.cat([torch.arange(s, s + n, device="cpu") for s, n in self.local_ranges(rank)])

    def scaled(self, factor_num: int, factor_den: int = 1) -> Optional["DimShard"]:
        """The same split with every size multiplied by num/den (a view regrouping the dim),
        or None if some piece would not start on a whole element."""
        new = []
        for c in self.splits:
            if (c.size * factor_num) % factor_den:
                return None
            unit = c.unit * factor_num // factor_den if (c.unit * factor_num) % factor_den == 0 else 1
            s = ChunkSplit(c.size * factor_num // factor_den, c.parts, c.stride, unit)
            if not s.valid():
                return None
            old_bounds = [x * factor_num for x in _bounds(c)]
            if old_bounds != [x * factor_den for x in _bounds(s)]:
                return None
            new.append(s)
        return self.with_splits(new)

    def covers(self, other: "DimShard", world_size: int) -> bool:
        """True when, on every rank, this rank's elements include those `other` wants."""
        if self.size != other.size or self.outer != other.outer:
            return False
        for r in range(world_size):
            have = set(self.index(r).tolist())
            if not set(other.index(r).tolist()) <= have:
                return False
        return True

    def describe(self) -> str:
        if self.uniform():
            c = self.splits[0]
            txt = f"{c.parts} parts" if c.parts > 1 else "whole on every rank"
            if c.stride != 1 and c.parts > 1:
                txt += f", each held by {c.stride} ranks"
            if len(self.chunks) > 1:
                txt += f", {len(self.chunks)} fused chunks {list(self.chunks)}"
        else:
            txt = "chunks " + ", ".join(
                f"{c.size}: " + (f"{c.parts} parts" + (f" x{c.stride}" if c.stride > 1 else "")
                                 if c.parts > 1 else "whole") for c in self.splits)
        if not self.even():
            world = max(c.parts * c.stride for c in self.splits)
            txt += f", uneven: rank sizes {list(self.local_sizes(world))}"
        if self.outer:
            txt += ", inside a dynamic outer dim"
        return txt


def _bounds(c: ChunkSplit) -> list[int]:
    out, acc = [0], 0
    for n in c.counts():
        acc += n * c.unit
        out.append(acc)
    return out


def _rebuild_dimshard(splits, outer):
    return DimShard(splits=splits, outer=outer)


class Origin(NamedTuple):
    """The column-parallel source a sharded dim traces back to one-to-one: the source node's
    name, its features per element of the dim, and the feature where the dim starts in the
    source (not 0 for a piece that a split or slice cut from it: Mamba's x|B|C inside the
    in_proj output), so that a refine asked for a piece re-cuts just that part."""
    source: str
    unit: int
    offset: int = 0


@dataclass(frozen=True)
class Sharded:
    """A tensor sharded along the dims in `dims` (dim index -> DimShard), others replicated."""

    dims: tuple[tuple[int, DimShard], ...]
    origin: tuple[tuple[int, Origin], ...] = field(default=(), compare=False)

    def get(self, dim: int) -> Optional[DimShard]:
        for d, s in self.dims:
            if d == dim:
                return s
        return None

    def origin_of(self, dim: int) -> Optional[Origin]:
        for d, org in self.origin:
            if d == dim:
                return org
        return None

    @staticmethod
    def of(dims: dict[int, DimShard], origin: Optional[dict[int, tuple]] = None) -> "Sharded":
        org = tuple(sorted((d, Origin(*o)) for d, o in (origin or {}).items() if d in dims))
        return Sharded(tuple(sorted(dims.items())), org)

    def moved(self, where) -> "Sharded":
        """The same split with each dim `d` at `where(d)` (a dim inserted or removed before
        it), origins kept."""
        return Sharded.of({where(d): s for d, s in self.dims},
                          {where(d): o for d, o in self.origin_dict().items()})

    def as_dict(self) -> dict[int, DimShard]:
        return dict(self.dims)

    def origin_dict(self) -> dict[int, Origin]:
        return dict(self.origin)

    def piece_origin(self, dim: int, start: int) -> dict[int, Origin]:
        """The origins of a piece of `dim` starting at element `start` (a split or slice)."""
        out = self.origin_dict()
        if dim in out:
            out[dim] = out[dim]._replace(offset=out[dim].offset + start * out[dim].unit)
        return out

    def describe(self) -> str:
        return "Shard(" + ", ".join(f"dim {d}: {s.describe()}" for d, s in self.dims) + ")"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; an all-reduce(sum) gives the true value."""

    def describe(self) -> str:
        return "Partial(sum)"


@dataclass(frozen=True)
class SequenceShard:
    """Sequence parallelism: every rank holds its own tokens of the whole value (the sequence
    split along `dim`, `runtime.sequence`'s split), whole along every other dim."""

    dim: int

    def describe(self) -> str:
        return f"SequenceShard(dim {self.dim})"


class _Replicate:
    def __repr__(self) -> str:
        return "Replicate()"

    def describe(self) -> str:
        return "Replicate()"


REPLICATE = _Replicate()
Placement = Union[_Replicate, Partial, Sharded, SequenceShard]


def split_dims_only(p: Placement) -> Placement:
    """`p` without the dims every rank holds whole (a piece of a fused source that cannot be
    split: Mamba-2's B with fewer groups than ranks). Such a dim is the same on every rank, so
    where operands meet it counts as replicated."""
    if not isinstance(p, Sharded):
        return p
    dims = {d: ds for d, ds in p.dims if ds.parts > 1}
    if len(dims) == len(p.dims):
        return p
    return Sharded.of(dims, p.origin_dict()) if dims else REPLICATE


def as_met(placements: list[Placement]) -> list[Placement]:
    """The placements of operands that meet in one op: where some operand is split, the dims
    every rank holds whole count as replicated (`split_dims_only`)."""
    if any(isinstance(p, Sharded) and any(ds.parts > 1 for _, ds in p.dims) for p in placements):
        return [split_dims_only(p) for p in placements]
    return list(placements)


def _expr(x):
    import sympy

    if isinstance(x, int):
        return sympy.Integer(x)
    node = getattr(x, "node", None)
    if node is not None:
        return sympy.sympify(node.expr)
    return sympy.Integer(int(x))


def group_dims(src: list, dst: list) -> Optional[list[tuple[list[int], list[int]]]]:
    """Groups the dims of a view/reshape: which input dims become which output dims.

    Sizes may be ints or symbolic sizes (SymInt); symbolic products are compared with sympy,
    so ``[b, s, 64] -> [b*s, 64]`` groups ``(b, s) -> (b*s,)``. Returns (input dims, output
    dims) groups of equal products, or None when the shapes cannot be aligned that way.
    Products sympy cannot prove equal (a padded length cut into chunks, `[b, L, h, d] ->
    [b, L // 128, L // (L // 128), h, d]`) are one group between the leading and trailing dims
    the two shapes share.
    """
    groups = _grouped_exprs(tuple(_expr(x) for x in src), tuple(_expr(x) for x in dst))
    return None if groups is None else [(list(gi), list(go)) for gi, go in groups]


@functools.lru_cache(maxsize=4096)
def _grouped_exprs(a: tuple, b: tuple) -> Optional[list[tuple[list[int], list[int]]]]:
    """`group_dims` of size expressions, remembered: every solver pass meets the same views,
    and sympy's simplify of floors and mods is slow."""
    groups = _grouped(list(a), list(b))
    return groups if groups is not None else _around_the_middle(list(a), list(b))


def _around_the_middle(a: list, b: list) -> Optional[list[tuple[list[int], list[int]]]]:
    """The dims two shapes share at both ends, one to one, and the rest as one group (the
    view keeps the numel, so the rest has equal products)."""
    n, m = len(a), len(b)
    head = 0
    while head < min(n, m) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(n, m) - head and a[n - 1 - tail] == b[m - 1 - tail]:
        tail += 1
    middle = (list(range(head, n - tail)), list(range(head, m - tail)))
    if not middle[0] or not middle[1] or not _equal_when_sampled(
            math.prod(a[k] for k in middle[0]), math.prod(b[k] for k in middle[1])):
        return None
    return ([([k], [k]) for k in range(head)] + [middle]
            + [([n - tail + k], [m - tail + k]) for k in range(tail)])


def _equal_when_sampled(x, y) -> bool:
    """Whether two size expressions agree at sampled sizes (sympy cannot always simplify
    floors and mods); sizes that differ somewhere are not one view's dims."""
    import sympy

    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    for base in (1, 2, 3, 7, 64, 127, 128, 129, 1000):
        values = {s: base + 5 * i for i, s in enumerate(symbols)}
        try:
            if sympy.simplify(x.subs(values) - y.subs(values)) != 0:
                return False
        except (TypeError, ValueError, ZeroDivisionError):
            return False
    return True


def _grouped(a: list, b: list) -> Optional[list[tuple[list[int], list[int]]]]:
    import sympy

    one = sympy.Integer(1)
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(a), len(b)
    while i < n or j < m:
        if i < n and a[i] == one and (j >= m or b[j] != one):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and b[j] == one and (i >= n or a[i] != one):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            return None
        gi, gj, ps, pd = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while ps != pd and sympy.simplify(ps - pd) != 0:
            num, den = sympy.fraction(sympy.cancel(pd / ps))
            if den == 1 and i < n:
                ps, gi = ps * a[i], gi + [i]
                i += 1
            elif num == 1 and j < m:
                pd, gj = pd * b[j], gj + [j]
                j += 1
            elif i < n:  # neither divides the other ([2, 3] -> [3, 2]): widen the group
                ps, gi = ps * a[i], gi + [i]
                i += 1
            elif j < m:
                pd, gj = pd * b[j], gj + [j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups
