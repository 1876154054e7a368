"""Placements of a tensor across the ranks of a tensor-parallel group.

A value in the graph is either replicated (every rank holds all of it), partial (every rank
holds a summand; the true value is the sum over ranks) or sharded along one or more dimensions.

A sharded dimension is described by :class:`DimShard`. It generalises DTensor's ``Shard(dim)``
in the two ways tensor parallelism of transformers needs:

* ``chunks``: the dimension is made of independent segments (fused q|k|v, gate|up) and each
  segment is split separately, so every rank takes its heads from every segment.
* ``parts`` / ``stride``: the number of distinct pieces may be smaller than the world size
  (GQA/MQA with fewer kv heads than ranks): rank ``r`` holds piece ``(r // stride) % parts`` and
  ranks that share a piece hold the same data, as vLLM replicates kv heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class DimShard:
    """How one dimension of a tensor is split over the ranks."""

    parts: int
    stride: int
    chunks: tuple[int, ...]

    def piece(self, rank: int) -> int:
        return (rank // self.stride) % self.parts

    @property
    def size(self) -> int:
        return sum(self.chunks)

    @property
    def local_size(self) -> int:
        return sum(c // self.parts for c in self.chunks)

    def valid(self) -> bool:
        return all(c % self.parts == 0 for c in self.chunks)

    def local_ranges(self, rank: int) -> list[tuple[int, int]]:
        """(start, length) of every global range this rank holds, in order."""
        out, base, p = [], 0, self.piece(rank)
        for c in self.chunks:
            length = c // self.parts
            out.append((base + p * length, length))
            base += c
        return out

    def index(self, rank: int) -> torch.Tensor:
        """The global indices this rank holds along the dimension."""
        return torch.cat([torch.arange(s, s + n) for s, n in self.local_ranges(rank)])

    def scaled(self, factor_num: int, factor_den: int = 1) -> Optional["DimShard"]:
        """The same split with every chunk multiplied by num/den, or None if not integral."""
        new = []
        for c in self.chunks:
            if (c * factor_num) % factor_den:
                return None
            new.append(c * factor_num // factor_den)
        return replace(self, chunks=tuple(new))

    def covers(self, other: "DimShard", world_size: int) -> bool:
        """True when, on every rank, this rank's piece contains the piece `other` wants."""
        if self.chunks != other.chunks or len(self.chunks) != 1:
            return self == other
        for r in range(world_size):
            (hs, hn), = self.local_ranges(r)
            (ws, wn), = other.local_ranges(r)
            if not (hs <= ws and ws + wn <= hs + hn):
                return False
        return True

    def describe(self) -> str:
        txt = f"{self.parts} parts"
        if self.stride != 1:
            txt += f", each held by {self.stride} ranks"
        if len(self.chunks) > 1:
            txt += f", {len(self.chunks)} fused chunks {list(self.chunks)}"
        return txt


@dataclass(frozen=True)
class Sharded:
    """A tensor sharded along the dims in `dims` (dim index -> DimShard), others replicated."""

    dims: tuple[tuple[int, DimShard], ...]
    # The column-parallel source a dim can be traced back to one-to-one:
    # dim -> (source node name, source features per element of this dim).
    origin: tuple[tuple[int, str, int], ...] = field(default=(), compare=False)

    def get(self, dim: int) -> Optional[DimShard]:
        for d, s in self.dims:
            if d == dim:
                return s
        return None

    def origin_of(self, dim: int) -> Optional[tuple[str, int]]:
        for d, src, unit in self.origin:
            if d == dim:
                return src, unit
        return None

    @staticmethod
    def of(dims: dict[int, DimShard], origin: Optional[dict[int, tuple[str, int]]] = None) -> "Sharded":
        org = tuple(sorted((d, s, u) for d, (s, u) in (origin or {}).items() if d in dims))
        return Sharded(tuple(sorted(dims.items())), org)

    def as_dict(self) -> dict[int, DimShard]:
        return dict(self.dims)

    def origin_dict(self) -> dict[int, tuple[str, int]]:
        return {d: (s, u) for d, s, u in self.origin}

    def describe(self) -> str:
        return "Shard(" + ", ".join(f"dim {d}: {s.describe()}" for d, s in self.dims) + ")"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; an all-reduce(sum) gives the true value."""

    def describe(self) -> str:
        return "Partial(sum)"


class _Replicate:
    def __repr__(self) -> str:
        return "Replicate()"

    def describe(self) -> str:
        return "Replicate()"


REPLICATE = _Replicate()
Placement = Union[_Replicate, Partial, Sharded]


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
    """
    import sympy

    a, b = [_expr(x) for x in src], [_expr(x) for x in dst]
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
        while sympy.simplify(ps - pd) != 0:
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
