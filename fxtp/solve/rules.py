"""Per-op sharding rules: how a sharded value passes through each aten op.

The rules are methods of `ShardingRules`, mixed into the solver's propagation pass: given the
placements of a node's inputs they return the placement of its output, record the rewrites the
op needs (size constants, local slices) or raise `_Fail` (the op cannot take that placement;
kind "refine" asks for the source to be split differently). Ops are recognised by their aten
overload and tags, never by the model they come from.
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Any, Optional

import torch
from torch import fx

from ..graph.ops import (
    DROPOUT,
    IDENTITY,
    NO_OUTPUT,
    NORMS,
    REDUCTIONS,
    SDPA,
    SOFTMAX,
    SPLITS,
    VIEWS,
    aten,
    dropout_active,
    functional_twin,
    is_pointwise,
)
from .placements import REPLICATE, ChunkSplit, DimShard, Partial, Sharded, group_dims


class _Fail(Exception):
    def __init__(self, text: str, kind: str = "unsupported"):
        super().__init__(text)
        self.text, self.kind = text, kind



def _shape(node: Any) -> Optional[list]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return list(val.shape)
    return None


def _static(x) -> Optional[int]:
    if isinstance(x, int):
        return x
    try:
        if x.node.is_constant():
            return int(x)
    except AttributeError:
        pass
    return None



class ShardingRules:
    """Rules for ops that receive a sharded value (mixed into the solver's pass, which provides
    `placement`, `actions`, `ws`, `single_head` and `_refine`)."""

    # -- sharded values -------------------------------------------------------------------
    def _sharded_rule(self, n: fx.Node, t) -> Any:
        x0 = n.args[0] if n.args else None
        if t in NO_OUTPUT:
            return REPLICATE
        if t == aten.sym_size.int:
            sp = self.placement(x0)
            if isinstance(sp, Sharded) and sp.get(_norm(n.args[1], len(_shape(x0)))):
                raise _Fail("reads the size of a sharded dim")
            return REPLICATE
        if t is operator.getitem:
            parent = self.placement(x0)
            if isinstance(parent, (list, tuple)):
                return parent[n.args[1]]
            raise _Fail("getitem on a sharded tensor")
        if t in VIEWS:
            return self._view(n)
        if t in (aten.transpose.int, aten.permute.default, aten.t.default, aten.numpy_T.default):
            return self._permute(n)
        if t == aten.unsqueeze.default:
            return self._unsqueeze(n)
        if t in (aten.squeeze.dim, aten.squeeze.dims):
            return self._squeeze(n)
        if t in (aten.expand.default, aten.broadcast_to.default):
            return self._expand(n)
        if t in (aten.flatten.using_ints, aten.unflatten.int):
            return self._view(n, size_arg=None)
        if t == aten.select.int:
            return self._select(n)
        if t == aten.index.Tensor:
            return self._index(n)
        if t in IDENTITY or (t in DROPOUT and not dropout_active(n)):
            if len([a for a in n.all_input_nodes]) == 1:
                return self._same(x0)
        if t == aten.slice.Tensor:
            return self._slice(n)
        if t in SPLITS:
            return self._split(n)
        if t == aten.cat.default:
            return self._cat(n)
        if t in SDPA:
            return self._sdpa(n)
        if t in SOFTMAX:
            return self._keep_unless(n, [n.args[1]])
        if t in REDUCTIONS:
            return self._reduction(n)
        if t in NORMS:
            return self._norm(n)
        if t in (aten.bmm.default, aten.matmul.default):
            return self._matmul(n)
        if t == aten.baddbmm.default:
            out = _shape(n)
            return self._align(n, [(0,), (1,), (2,)], out, forbid=[len(out) - 2, len(out) - 1],
                               allow_rank_diff=True)
        if t == aten.index_copy.default:
            return self._index_copy(n)
        if is_pointwise(t):
            return self._pointwise(n)
        raise _Fail(f"no sharding rule for {getattr(t, '__name__', t)}; the value it reads is sharded")

    def _same(self, x) -> Sharded:
        sp = self.placement(x)
        if not isinstance(sp, Sharded):
            raise _Fail("expected a sharded input")
        return sp

    def _input(self, n: fx.Node) -> tuple[fx.Node, Sharded, list]:
        x = n.args[0]
        sp = self.placement(x)
        if not isinstance(sp, Sharded):
            raise _Fail("expected a sharded input")
        return x, sp, _shape(x)

    def _view(self, n: fx.Node, size_arg: Optional[int] = 1) -> Sharded:
        x, sp, src = self._input(n)
        dst = _shape(n)
        groups = group_dims(src, dst)
        if groups is None:
            raise _Fail(f"cannot relate view shapes {src} -> {dst}")
        dims: dict[int, DimShard] = {}
        origin: dict[int, tuple[str, int]] = {}
        for gi, go in groups:
            sh = [(d, sp.get(d)) for d in gi if sp.get(d) is not None]
            if not sh:
                continue
            if len(sh) > 1:
                raise _Fail("merges two sharded dims")
            d, ds = sh[0]
            if ds.outer:
                j, new, unit = self._view_outer(sp, d, ds, gi, go, src, dst)
            else:
                j, new, unit = self._view_inner(sp, d, ds, gi, go, src, dst, groups)
            dims[j] = new
            if unit is not None:
                origin[j] = (sp.origin_of(d)[0], unit)
            if size_arg is not None:
                self._rewrite_size(n, size_arg, j, new)
            elif n.target == aten.unflatten.int and new.local_sizes(self.ws) != (new.size,) * self.ws:
                raise _Fail("unflattens a sharded dim (its sizes are not rewritten yet)")
        return Sharded.of(dims, origin)

    def _view_inner(self, sp: Sharded, d: int, ds: DimShard, gi: list, go: list, src: list,
                    dst: list, groups: list) -> tuple[int, DimShard, Optional[int]]:
        """A view regrouping a sharded dim with static inner dims (heads <-> features), or
        merging it with outer dims (then the result is an `outer` dim)."""
        outer = any(_static(src[k]) != 1 for k in gi if k < d)
        inner_in = _prod([src[k] for k in gi if k > d])
        if inner_in is None:
            raise _Fail("merges a sharded dim with a dynamic dim")
        flat = ds.scaled(inner_in)
        outs = [j for j in go if _static(dst[j]) != 1]
        if not outs:
            raise _Fail("views a sharded dim as size 1")
        if outer:
            if len(outs) != 1 or flat is None:
                raise _Fail("merges a sharded dim into an outer dim and splits it again")
            return outs[0], flat.with_splits(flat.splits, outer=True), None
        j = outs[0]
        new_unit_dim = j != go[0] or ([], [j - 1]) in groups
        if new_unit_dim and _static(dst[j - 1]) == 1 and sp.origin_of(d) is not None:
            self.single_head.add(sp.origin_of(d)[0])
        inner_out = _prod([dst[k] for k in go if k > j])
        if inner_out is None:
            raise _Fail("splits a sharded dim into a dynamic dim")
        new = flat.scaled(1, inner_out) if flat is not None else None
        org = sp.origin_of(d)
        unit = None
        if org is not None:
            u = Fraction(org[1], inner_in) * inner_out
            unit = int(u) if u.denominator == 1 else None
        if new is None or not new.valid():
            heads = _static(dst[j])
            # whole heads: split the source at head boundaries (unevenly if the count does not
            # divide); fewer heads than ranks: groups of ranks hold the same heads (kv heads,
            # as vLLM does), or every rank all of them when no group size fits
            if unit is not None and self._refine(sp, d, lambda cur, _u: _split_in_heads(cur, unit)):
                raise _Fail("source split refined", "refine")
            raise _Fail(f"splits a dim of {ds.size} into {dst[j]} x {inner_out}: {heads} heads "
                        f"cannot be shared out over {ds.parts} ranks", "not_divisible")
        return j, new, unit

    def _view_outer(self, sp: Sharded, d: int, ds: DimShard, gi: list, go: list, src: list,
                    dst: list) -> tuple[int, DimShard, Optional[int]]:
        """A view of a dim that is (dynamic outer) x (sharded block): kept merged, or split
        back into the outer dims and the block (BLOOM's [b * heads, s, d] -> [b, heads, s, d])."""
        if gi != [d]:
            raise _Fail("merges a dim holding a sharded block with other dims")
        if len(go) == 1:
            return go[0], ds, None
        for t in range(1, len(go)):
            tail = _prod([dst[k] for k in go[t:]])
            if tail == ds.size:
                j = go[t]
                inner_out = _prod([dst[k] for k in go[t + 1:]])
                new = ds.with_splits(ds.splits, outer=False).scaled(1, inner_out)
                if new is None or not new.valid():
                    break
                return j, new, None
        raise _Fail("splits a dim holding a sharded block, not at the block's boundary")

    def _rewrite_size(self, n: fx.Node, arg: int, pos: int, spec: DimShard) -> None:
        sizes = n.args[arg]
        if not isinstance(sizes, (list, tuple)) or pos >= len(sizes):
            raise _Fail("size argument not a list")
        v = sizes[pos]
        local = spec.local_sizes(self.ws)
        if isinstance(v, int):
            if v == -1 or all(v == x for x in local):
                return
            if spec.outer and v % spec.size == 0:
                self.actions.int_args.append((n.name, (arg, pos), _per_rank([v // spec.size * x for x in local])))
                return
            if v != spec.size:
                raise _Fail(f"size constant {v} does not match the sharded dim of {spec.size}")
            self.actions.int_args.append((n.name, (arg, pos), _per_rank(local)))
            return
        if spec.outer and isinstance(v, fx.Node):
            # (outer x block) computed at run time (b * heads): scaled to the local block
            self.actions.sym_sizes.append((n.name, (arg, pos), spec.size, _per_rank(local)))
            return
        raise _Fail("a sharded dim's size is computed at run time")

    def _select(self, n: fx.Node) -> Any:
        x, sp, src = self._input(n)
        dim = _norm(n.args[1], len(src))
        if sp.get(dim) is not None:
            self._pick(sp, dim, [n.args[2]])
        shift = lambda d: d - 1 if d > dim else d
        return _placement({shift(d): s for d, s in sp.dims if d != dim},
                          {shift(d): o for d, o in sp.origin_dict().items() if d != dim})

    def _index(self, n: fx.Node) -> Any:
        """x[..., idx, ...] with one index tensor; on a sharded dim only constant indices into
        chunks that every rank holds whole (the k and v heads of a fused multi-query qkv)."""
        x, sp, src = self._input(n)
        indices = list(n.args[1])
        used = [k for k, i in enumerate(indices) if i is not None]
        if len(used) != 1 or isinstance(self.placement(indices[used[0]]), Sharded):
            raise _Fail("advanced indexing of a sharded tensor")
        k = used[0]
        if sp.get(k) is not None:
            values = self._constant_ints(indices[k])
            if values is None:
                raise _Fail("indexes a sharded dim with indices computed at run time")
            self._pick(sp, k, values)
        extra = len(_shape(indices[k]) or []) - 1
        shift = lambda d: d + extra if d > k else d
        return _placement({shift(d): s for d, s in sp.dims if d != k},
                          {shift(d): o for d, o in sp.origin_dict().items() if d != k})

    def _constant_ints(self, node: Any) -> Optional[list[int]]:
        """The values of a constant index tensor (a lifted constant, maybe copied)."""
        while isinstance(node, fx.Node) and node.op == "call_function" and \
                functional_twin(node.target) in IDENTITY:
            node = node.args[0]
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        value = self.gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor) or value.dim() > 1 or value.is_floating_point():
            return None
        return [int(v) for v in value.reshape(-1).tolist()]

    def _pick(self, sp: Sharded, dim: int, picks: list) -> None:
        """Elements picked from a sharded dim: they must lie in chunks every rank holds whole,
        at the same local position on every rank; else ask for those elements as whole chunks."""
        ds = sp.get(dim)
        if ds.outer or not all(isinstance(i, int) for i in picks):
            raise _Fail("picks elements of a sharded dim")
        size, bounds = ds.size, self._boundaries(ds)
        glob = [i + size if i < 0 else i for i in picks]
        whole = all(ds.splits[_chunk_of(bounds, g)].parts == 1 for g in glob)
        if not whole:
            def make(cur: DimShard, unit: int) -> Optional[DimShard]:
                if cur.size != ds.size * unit:   # a piece of the source: offsets unknown
                    return None
                return _whole_chunks(cur, [(g * unit, (g + 1) * unit) for g in glob])
            if self._refine(sp, dim, make):
                raise _Fail("source split refined", "refine")
            raise _Fail("picks elements of a sharded dim")
        for r in range(self.ws):
            layout = ds.index(r).tolist()
            for i, g in zip(picks, glob):
                local = layout.index(g)
                if (local if i >= 0 else local - len(layout)) != i:
                    raise _Fail(f"index {i} of a sharded dim would need a different constant "
                                f"on rank {r}")

    def _permute(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        r = len(src)
        if n.target == aten.transpose.int:
            a, b = _norm(n.args[1], r), _norm(n.args[2], r)
            perm = list(range(r))
            perm[a], perm[b] = perm[b], perm[a]
        elif n.target == aten.permute.default:
            perm = [_norm(d, r) for d in n.args[1]]
        else:
            perm = list(reversed(range(r)))
        inv = {old: new for new, old in enumerate(perm)}
        return Sharded.of({inv[d]: s for d, s in sp.dims},
                          {inv[d]: o for d, o in sp.origin_dict().items()})

    def _unsqueeze(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        d0 = _norm(n.args[1], len(src) + 1)
        shift = lambda d: d + 1 if d >= d0 else d
        return Sharded.of({shift(d): s for d, s in sp.dims},
                          {shift(d): o for d, o in sp.origin_dict().items()})

    def _squeeze(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        gone = {_norm(d, len(src)) for d in dims if _static(src[_norm(d, len(src))]) == 1}
        if any(d in gone for d, _ in sp.dims):
            raise _Fail("squeezes a sharded dim")
        shift = lambda d: d - sum(1 for g in gone if g < d)
        return Sharded.of({shift(d): s for d, s in sp.dims},
                          {shift(d): o for d, o in sp.origin_dict().items()})

    def _expand(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        off = len(n.args[1]) - len(src)
        dims = {d + off: s for d, s in sp.dims}
        for d, s in dims.items():
            self._rewrite_size(n, 1, d, s)
        return Sharded.of(dims, {d + off: o for d, o in sp.origin_dict().items()})

    def _boundaries(self, ds: DimShard) -> list[int]:
        out, acc = [0], 0
        for c in ds.chunks:
            acc += c
            out.append(acc)
        return out

    def _cut(self, n: fx.Node, sp: Sharded, dim: int, cuts: list[int]) -> list[DimShard]:
        """Splits a sharded dim at global offsets `cuts`; each piece must be whole chunks."""
        ds = sp.get(dim)
        if ds.outer:
            raise _Fail("cuts a dim holding a sharded block")
        bounds = self._boundaries(ds)
        if all(c in bounds for c in cuts):
            pieces = []
            for a, b in zip(cuts[:-1], cuts[1:]):
                i, j = bounds.index(a), bounds.index(b)
                pieces.append(ds.with_splits(ds.splits[i:j]))
            return pieces

        def make(cur: DimShard, unit: int) -> Optional[DimShard]:
            if cur.size != ds.size * unit:   # a piece of the source: offsets unknown
                return None
            return _recut(cur, [c * unit for c in cuts])
        if self._refine(sp, dim, make):
            raise _Fail("source split refined", "refine")
        raise _Fail(f"cuts a sharded dim at {cuts}, not at the boundaries of its shards")

    def _slice(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        dim = _norm(n.args[1] if len(n.args) > 1 else 0, len(src))
        ds = sp.get(dim)
        if ds is None:
            return sp
        start = n.args[2] if len(n.args) > 2 else 0
        end = n.args[3] if len(n.args) > 3 else None
        step = n.args[4] if len(n.args) > 4 else 1
        if step != 1 or not isinstance(start, (int, type(None))) or not isinstance(end, (int, type(None))):
            raise _Fail("strided or dynamic slice of a sharded dim")
        size = ds.size
        start = 0 if start is None else (start + size if start < 0 else min(start, size))
        end = size if end is None else (end + size if end < 0 else min(end, size))
        piece, = self._cut(n, sp, dim, [start, end])
        first = self._boundaries(ds).index(start)
        lstart = [sum(c.range(r)[1] for c in ds.splits[:first]) for r in range(self.ws)]
        lend = [a + b for a, b in zip(lstart, piece.local_sizes(self.ws))]
        self.actions.int_args.append((n.name, (2,), _per_rank(lstart)))
        self.actions.int_args.append((n.name, (3,), _per_rank(lend)))
        dims = sp.as_dict()
        dims[dim] = piece
        return Sharded.of(dims, sp.origin_dict())

    def _split(self, n: fx.Node) -> list:
        x, sp, src = self._input(n)
        outs = n.meta.get("val")
        dim = _norm(n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0), len(src))
        ds = sp.get(dim)
        if ds is None:
            return [sp for _ in outs]
        sizes = [int(o.shape[dim]) for o in outs]
        cuts = [0]
        for s in sizes:
            cuts.append(cuts[-1] + s)
        pieces = self._cut(n, sp, dim, cuts)
        per_rank = [[p.local_size_of(r) for p in pieces] for r in range(self.ws)]
        if n.target == aten.split_with_sizes.default:
            for i in range(len(pieces)):
                self.actions.int_args.append((n.name, (1, i), _per_rank([loc[i] for loc in per_rank])))
        elif n.target in (aten.split.Tensor, aten.chunk.default):
            for loc in per_rank:
                if any(v != loc[0] for v in loc[:-1]) or loc[-1] > loc[0] or \
                        (n.target == aten.chunk.default and loc[-1] != loc[0]):
                    raise _Fail("split pieces would have unequal local sizes")
            if n.target == aten.split.Tensor:
                self.actions.int_args.append((n.name, (1,), _per_rank([loc[0] for loc in per_rank])))
        # chunk(n) keeps its count: equal local pieces on every rank
        result = []
        for p in pieces:
            dims = sp.as_dict()
            dims[dim] = p
            result.append(Sharded.of(dims, sp.origin_dict()))
        return result

    def _cat(self, n: fx.Node) -> Sharded:
        tensors = n.args[0]
        out = _shape(n)
        dim = _norm(n.args[1] if len(n.args) > 1 else 0, len(out))
        specs = [self.placement(t) for t in tensors]
        if all(isinstance(s, Sharded) and s.get(dim) for s in specs):
            if any(s.get(dim).outer for s in specs):
                raise _Fail("concatenates dims holding sharded blocks")
            rest = [tuple((d, v) for d, v in s.dims if d != dim) for s in specs]
            if any(r != rest[0] for r in rest):
                raise _Fail("concatenates differently sharded pieces")
            dims = dict(rest[0])
            dims[dim] = DimShard(splits=tuple(c for s in specs for c in s.get(dim).splits))
            return Sharded.of(dims)
        return self._align(n, [(0, i) for i in range(len(tensors))], out, forbid=[dim])

    def _sdpa(self, n: fx.Node) -> Sharded:
        q = n.args[0]
        out = _shape(q)
        r = len(out)
        operands = [(i,) for i in range(3)]
        if len(n.args) > 3 and isinstance(n.args[3], fx.Node):
            operands.append((3,))
        if n.kwargs.get("enable_gqa"):
            raise _Fail("sdpa with enable_gqa has no sharding rule yet")
        result = self._align(n, operands, out, forbid=[r - 2, r - 1], allow_rank_diff=True)
        return result

    def _index_copy(self, n: fx.Node) -> Sharded:
        """x.index_copy_(dim, idx, src): src written into x at `idx` along `dim` (a static KV
        cache being filled, `[b, kv_heads, max_len, d]`). The indexed dim must be whole; the
        other dims align as in a pointwise op, so a replicated x meeting a src sharded by heads
        keeps only this rank's heads. Written in place, x must then be a tensor attribute (a
        cache buffer) used nowhere else: it is sliced once, in place, and the cache each rank
        holds is its own heads only."""
        x, idx, src = n.args[0], n.args[2], n.args[3]
        out = _shape(n)
        if out is None or _shape(src) is None or len(_shape(src)) != len(out):
            raise _Fail("index_copy with a source of another rank")
        if isinstance(self.placement(idx), Sharded):
            raise _Fail("index_copy with sharded indices")
        dim = _norm(n.args[1], len(out))
        before = len(self.actions.narrows)
        result = self._align(n, [(0,), (3,)], out, forbid=[dim])
        in_place = n.target is not functional_twin(n.target)
        narrowed_self = any(path == (0,) for _, path, *_ in self.actions.narrows[before:])
        if in_place and narrowed_self and not (x.op == "get_attr" and len(x.users) == 1):
            raise _Fail("writes a sharded value in place into a replicated tensor that is read "
                        "elsewhere too (it cannot be sliced in place)")
        return result

    def _keep_unless(self, n: fx.Node, dims: list) -> Sharded:
        x, sp, src = self._input(n)
        for d in dims:
            if sp.get(_norm(d, len(src))) is not None:
                raise _Fail(f"{n.target} runs along a sharded dim")
        if n.target in SOFTMAX or len(n.all_input_nodes) == 1:
            return sp
        raise _Fail("unexpected operands")

    def _reduction(self, n: fx.Node) -> Sharded:
        x, sp, src = self._input(n)
        r = len(src)
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            raise _Fail("reduces over all dims of a sharded tensor")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = {_norm(d, r) for d in dims}
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if any(d in dims for d, _ in sp.dims):
            raise _Fail(f"{n.target} reduces over a sharded dim")
        if keep:
            return sp
        shift = lambda d: d - sum(1 for g in dims if g < d)
        return Sharded.of({shift(d): s for d, s in sp.dims})

    def _norm(self, n: fx.Node) -> Any:
        x, sp, src = self._input(n)
        if any(isinstance(self.placement(a), Sharded) for a in n.all_input_nodes if a is not x):
            raise _Fail("normalisation with sharded affine parameters")
        k = len(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) else 1
        if any(d >= len(src) - k for d, _ in sp.dims):
            raise _Fail("normalises over a sharded dim")
        if n.target == aten.native_layer_norm.default:
            return [sp, sp, sp]
        return sp

    def _matmul(self, n: fx.Node) -> Any:
        a, b = n.args[0], n.args[1]
        sa, sb = _shape(a), _shape(b)
        if len(sa) < 2 or len(sb) < 2:
            raise _Fail("matmul of vectors on sharded values")
        out = _shape(n)
        pa, pb = self.placement(a), self.placement(b)
        ka = pa.get(len(sa) - 1) if isinstance(pa, Sharded) else None
        kb = pb.get(len(sb) - 2) if isinstance(pb, Sharded) else None
        if ka is not None or kb is not None:
            raise _Fail("matmul contracts a sharded dim")
        for p, s, d in ((pa, sa, len(sa) - 2), (pb, sb, len(sb) - 1)):
            if isinstance(p, Sharded) and p.get(d) is not None:
                raise _Fail("matmul with a sharded row/column dim")
        # batch dims behave like broadcasting
        return self._align(n, [(0,), (1,)], out, forbid=[len(out) - 2, len(out) - 1],
                           allow_rank_diff=True, trailing=2)

    def _pointwise(self, n: fx.Node) -> Sharded:
        out = _shape(n)
        if out is None:
            raise _Fail("pointwise op without a tensor result")
        paths = []
        for i, a in enumerate(n.args):
            if isinstance(a, fx.Node) and _shape(a) is not None:
                paths.append((i,))
        for k, a in n.kwargs.items():
            if isinstance(a, fx.Node) and _shape(a) is not None:
                paths.append((k,))
        return self._align(n, paths, out)

    def _align(self, n: fx.Node, paths: list[tuple], out: list, forbid=(), allow_rank_diff=False,
               trailing: int = 0) -> Sharded:
        """Broadcast-aligns operands; all sharded dims must agree, replicated ones are narrowed."""
        r = len(out)
        operands = []
        for path in paths:
            node = _get(n, path)
            shp = _shape(node)
            operands.append((path, node, self.placement(node), shp, r - len(shp)))
        want: dict[int, DimShard] = {}
        want_of: dict[int, tuple[Sharded, int]] = {}   # output dim -> the operand it came from
        origin: dict[int, tuple[str, int]] = {}
        for path, node, p, shp, off in operands:
            if isinstance(p, Partial):
                raise _Fail("partial sum meets a sharded value")
            if isinstance(p, Sharded):
                for d, s in p.dims:
                    od = d + off
                    if od in forbid or (od < 0):
                        raise _Fail(f"{n.target} needs dim {d} whole but it is sharded")
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
                if d < 0 or _static(shp[d]) == 1:
                    continue
                have = p.get(d) if isinstance(p, Sharded) else None
                if have == s:
                    continue
                if have is not None and not have.covers(s, self.ws):
                    # two sources meet split differently (a low-rank branch beside a fused qkv
                    # base refined into chunks): split this operand's source like the other
                    if have.size == s.size and self._refine(
                            p, d, lambda cur, unit: s if unit == 1 and cur == have else None):
                        raise _Fail("source split refined", "refine")
                    self._align_units(p, d, have, want_of.get(od), od, s)
                    raise _Fail(f"operands of {n.target} are sharded differently")
                if isinstance(p, Sharded) and have is None:
                    raise _Fail(f"operands of {n.target} are sharded on different dims")
                if have is None and not s.outer and _static(shp[d]) != s.size:
                    raise _Fail(f"operand size {shp[d]} does not match the sharded dim")
                self.actions.narrows.append((n.name, path, d, have, s))
        return Sharded.of(want, origin)



    def _align_units(self, p: Sharded, d: int, have: DimShard, wanted: Optional[tuple],
                     od: int, s: DimShard) -> None:
        """Two operands split the same chunks at different boundaries (q heads vs kv heads
        repeated for GQA, uneven or held by groups of ranks): both sources are re-split in whole
        heads of the coarser unit, so that each rank's q heads and kv heads line up."""
        if have.chunks != s.chunks:
            return
        unit = max(math.lcm(a.unit, b.unit) for a, b in zip(have.splits, s.splits))
        refined = False
        for spec, dim in ([(p, d)] + ([wanted] if wanted else [])):
            refined |= self._refine(spec, dim, lambda cur, u: _split_in_heads(cur, unit * u))
        if refined:
            raise _Fail("source split refined", "refine")


def _per_rank(values: list) -> Any:
    """One int when every rank gets the same value, else a tuple indexed by rank."""
    return values[0] if all(v == values[0] for v in values) else tuple(values)


def _placement(dims: dict, origin: dict) -> Any:
    return Sharded.of(dims, origin) if dims else REPLICATE


def _chunk_of(bounds: list[int], pos: int) -> int:
    return max(i for i, b in enumerate(bounds[:-1]) if b <= pos)


def _fit(c: ChunkSplit) -> ChunkSplit:
    """A chunk with fewer units than pieces is held by groups of ranks, or whole by every rank
    when no group size fits."""
    if c.valid():
        return c
    g = math.gcd(c.units, c.parts) if c.size % c.unit == 0 else 1
    if g > 1:
        return ChunkSplit(c.size, g, c.stride * (c.parts // g), c.unit)
    return ChunkSplit(c.size, 1, c.parts * c.stride, 1)


def _recut(cur: DimShard, cuts: list[int]) -> Optional[DimShard]:
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
        out.append(_fit(ChunkSplit(e - a, c.parts, c.stride, unit)))
    return cur.with_splits(out)


def _whole_chunks(cur: DimShard, ranges: list[tuple[int, int]]) -> Optional[DimShard]:
    """The source split with the elements in `ranges` as chunks every rank holds whole."""
    cut = _recut(cur, [x for r in ranges for x in r])
    out, acc = [], 0
    for c in cut.splits:
        if any(a <= acc and acc + c.size <= e for a, e in ranges):
            c = ChunkSplit(c.size, 1, c.parts * c.stride, 1)
        out.append(c)
        acc += c.size
    return cur.with_splits(out)


def _split_in_heads(cur: DimShard, head: int) -> Optional[DimShard]:
    """The source split at whole heads of `head` features: uneven when the head count does not
    divide, groups of ranks sharing heads when there are fewer heads than pieces (as vLLM does
    for kv heads), every rank holding all of them when no group size fits. A lone single-head
    source is left to the solver (kept replicated: MQA's kv projection)."""
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
        elif len(cur.splits) > 1 or units > 1:
            out.append(ChunkSplit(c.size, 1, c.stride * c.parts, u))
        else:
            return None
    return cur.with_splits(out)


def _get(n: fx.Node, path: tuple):
    head = n.args[path[0]] if isinstance(path[0], int) else n.kwargs[path[0]]
    for p in path[1:]:
        head = head[p]
    return head


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _prod(sizes) -> Optional[int]:
    out = 1
    for s in sizes:
        v = _static(s)
        if v is None:
            return None
        out *= v
    return out
