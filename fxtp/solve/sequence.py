"""Sequence parallelism (Megatron-SP), decided from the solved graph.

With tensor parallelism alone, every rank holds the whole of the replicated region between a
row-parallel output and the next column-parallel input: residual adds, norms, casts. Those ops
work token by token, so each rank can hold only its own tokens of them instead. The layer's
all-reduce becomes a reduce-scatter into the sequence shards, and an all-gather brings the
whole sequence back where something needs it (a column-parallel linear, attention, the
output); the bytes moved are the same, the region's activations are 1/N per rank:

    before:  o = all_reduce(linear(a, W_rows));  x2 = x + o;  h = norm(x2);  q = linear(f(h), W_cols)
    after:   o = reduce_scatter(linear(a, W_rows)); x2 = x + o;  h = norm(x2)   (x, x2, h: own tokens)
             q = linear(all_gather(h), W_cols)

The region is found, not named. It starts at the all-reduces of the layers' partial sums (a
row-parallel linear's or a vocab-parallel lookup's) whose users work token by token, and grows
through every replicated op that does (`_token_dim`): pointwise ops, casts, norms and
reductions over other dims, views that keep the sequence its own dim. A replicated value with
a sequence dim that such an op reads (the embeddings at the first residual add) is cut to the
rank's tokens where it is read (no communication), and its other token-wise readers join the
region (the first layer's norm). Ops that mix tokens (attention, convolutions along time,
cumsum, masks over [s, s], reshapes that merge the sequence with the batch) keep their whole
input. A part of the region that would send more than its all-reduces did, and more than 1/8
over its cheapest layout, is cut down to that layout (`sequence_cut`, a minimum cut); an
all-reduce it keeps comes with the reason (`SequenceActions.kept`).

The sequence is dim 1 of the first tensor input (the token ids of a Hugging Face model); the
shard sizes are computed from its length at run time (`runtime.sequence.local_length`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx

from ..graph.ops import (
    DROPOUT,
    IDENTITY,
    LIKE,
    NORMS,
    PARTIAL_SHAPE_OPS,
    REDUCTIONS,
    SOFTMAX,
    TRANSPOSES,
    VIEWS,
    aten,
    functional_twin,
    is_pointwise,
)
from .placements import REPLICATE, Partial, SequenceShard, Sharded, group_dims
from .records import Actions, Reason, SequenceActions, SequenceGather, Solution
from .sequence_cut import cheapest_region

SHAPE_KEEPING = TRANSPOSES | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                              aten.squeeze.default}
ALONG_A_DIM = {aten.slice.Tensor, aten.select.int, aten.cat.default}


def sequence_input(gm: fx.GraphModule) -> Optional[tuple[str, int, str]]:
    """(placeholder, dim, size symbol) of the sequence: dim 1 of the first tensor input that
    has a dynamic dim 1."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and _symbol(val.shape[1]):
            return n.name, 1, _symbol(val.shape[1])
    return None


def _symbol(size) -> str:
    if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
        return str(size.node.expr)
    return ""


def _mentions(size, symbol: str) -> bool:
    return isinstance(size, torch.SymInt) and symbol in {str(x) for x in size.node.expr.free_symbols}


def seq_dim(val, symbol: str) -> Optional[int]:
    """The dim of `val` whose size is the sequence; None when none is, or when the sequence
    is in several dims or inside a product (a mask over [s, s], a [b * s, h] view)."""
    if not isinstance(val, torch.Tensor):
        return None
    dims = [d for d, size in enumerate(val.shape) if _mentions(size, symbol)]
    if len(dims) != 1 or _symbol(val.shape[dims[0]]) != symbol:
        return None
    return dims[0]


def partial_producer(nodes: dict, act: Actions, value: str) -> fx.Node:
    """The op that made a partial sum (a row-parallel linear, a vocab-parallel lookup, a
    statistic), found by walking back through the ops it flowed through."""
    node = nodes[value]
    while (node.name not in act.rows and node.name not in act.vocab_embeddings
           and isinstance(act.placements.get(node.name), Partial)):
        partial_args = [a for a in node.all_input_nodes
                        if isinstance(act.placements.get(a.name), Partial)]
        if not partial_args:
            break
        node = partial_args[0]
    return node


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _size_args(n: fx.Node, symbol: str) -> Optional[list[tuple]]:
    """Paths of `n`'s arguments that are the sequence length; None when an argument is some
    other size computed from it (s - 1, b * s): the op would need it recomputed."""
    paths = []

    def visit(x, path):
        if isinstance(x, fx.Node):
            v = x.meta.get("val")
            if isinstance(v, torch.SymInt) and _mentions(v, symbol):
                if _symbol(v) != symbol:
                    raise ValueError
                paths.append(path)
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                visit(y, path + (i,))

    try:
        for i, a in enumerate(n.args):
            visit(a, (i,))
        for k, a in n.kwargs.items():
            visit(a, (k,))
    except ValueError:
        return None
    return paths


def _dims_arg(n: fx.Node, index: int, ndim: int) -> list[int]:
    dims = n.args[index] if len(n.args) > index else n.kwargs.get("dim")
    if dims is None:
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims] if ndim else []


def _token_dim(n: fx.Node, symbol: str) -> Optional[int]:
    """The sequence dim of `n`'s output when `n` computes each token from that token alone
    (its inputs' sequence dims line up with it, or they have none); else None."""
    if n.op != "call_function":
        return None
    out = n.meta.get("val")
    d = seq_dim(out, symbol)
    inputs = _tensor_inputs(n)
    if d is None or not inputs or _size_args(n, symbol) is None:
        return None
    t = functional_twin(n.target)
    x = inputs[0]
    d_in = seq_dim(x.meta["val"], symbol)
    if is_pointwise(t) or t in IDENTITY or t in DROPOUT or t in LIKE or t is aten.where.self:
        for a in inputs:
            v = a.meta["val"]
            da = seq_dim(v, symbol)
            if da is None and any(_mentions(s, symbol) for s in v.shape):
                return None
            if da is not None and da + out.dim() - v.dim() != d:
                return None
        return d
    if t is aten.cat.default:       # along another dim, every piece's tokens lined up
        axis = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        ok = axis % out.dim() != d and all(seq_dim(a.meta["val"], symbol) == d for a in inputs)
        return d if ok else None
    others = inputs[1:]
    if d_in is None or any(seq_dim(a.meta["val"], symbol) is not None
                           or any(_mentions(s, symbol) for s in a.meta["val"].shape)
                           for a in others):
        return None
    ndim = x.meta["val"].dim()
    if t in SHAPE_KEEPING or t is aten.expand.default:
        return d
    if t in VIEWS:
        groups = group_dims(list(x.meta["val"].shape), list(out.shape))
        return d if groups and ([d_in], [d]) in groups else None
    if t in REDUCTIONS:
        return d if d_in not in _dims_arg(n, 1, ndim) else None
    if t in SOFTMAX:
        return d if n.args[1] % ndim != d_in else None
    if t in NORMS:
        return d if d_in < ndim - len(n.args[1]) else None
    if t in ALONG_A_DIM:
        axis = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return d if axis % ndim != d_in else None
    return None


def reads_size(u: fx.Node) -> bool:
    """A `sym_size` read of a value: it needs no data, only the whole length."""
    return u.op == "call_function" and u.target is aten.sym_size.int


def _why_not(n: fx.Node, symbol: str) -> str:
    what = f"{n.name} ({getattr(n.target, '__name__', n.target)})"
    if n.op == "output":
        return "its value is the model's output"
    if seq_dim(n.meta.get("val"), symbol) is None:
        return f"{what} has no sequence dim of its own (merged with another dim, or absent)"
    return f"{what} mixes tokens (or fxtp does not know it as token-wise)"


def bytes_per_token(val) -> int:
    """Bytes of `val` per batch x sequence element: its static dims times the element size."""
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for size in val.shape:
        numel *= size if isinstance(size, int) else 1
    return numel * val.element_size()


class _Region:
    """The sequence-sharded nodes being decided, and what they read and feed."""

    def __init__(self, gm: fx.GraphModule, act: Actions, found: tuple[str, int, str]):
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.act, self.input, self.symbol = act, found[0], found[2]
        self.sp: dict[str, int] = {}
        self.scattered: set[str] = set()
        sites = [v for v in act.reduces
                 if partial_producer(self.nodes, act, v).name in (*act.rows, *act.vocab_embeddings)]
        self.layer_sites = sites
        self.site_users = {v: set(act.reduces[v]) for v in sites
                           if seq_dim(self.nodes[v].meta.get("val"), self.symbol) is not None}

    def replicated(self, a: fx.Node) -> bool:
        return (self.act.placements.get(a.name, REPLICATE) is REPLICATE
                and a.name not in self.act.reduces)

    def sharded_reader(self, u: fx.Node) -> bool:
        """A reader whose gradient each rank has only part of (a sharded or partial result,
        or views of the value that only such ops read): the all-gather's backward sums it."""
        p = self.act.placements.get(u.name, REPLICATE)
        if isinstance(p, (Sharded, Partial)):
            return True
        return (p is REPLICATE and u.op == "call_function" and bool(u.users)
                and functional_twin(u.target) in PARTIAL_SHAPE_OPS
                and all(self.sharded_reader(w) for w in u.users))

    def with_seq(self, a: fx.Node) -> bool:
        return seq_dim(a.meta.get("val"), self.symbol) is not None

    def grow(self) -> None:
        """Adds every replicated token-wise op that reads the region, a layer's partial sum
        or a value already cut to the tokens, until nothing changes."""
        changed = True
        while changed:
            changed = False
            for n in self.nodes.values():
                if n.name in self.sp or n.op != "call_function" or not self.replicated(n):
                    continue
                d = _token_dim(n, self.symbol)
                if d is None:
                    continue
                trigger, ok = False, True
                for a in _tensor_inputs(n):
                    if a.name in self.sp or n.name in self.site_users.get(a.name, ()):
                        trigger = True
                    elif self.replicated(a):
                        trigger = trigger or a.name in self.scattered
                    else:
                        ok = False
                if ok and trigger:
                    self.sp[n.name] = d
                    self.scattered |= {a.name for a in _tensor_inputs(n)
                                       if self.replicated(a) and self.with_seq(a)}
                    changed = True

    def outside_readers(self, name: str) -> list[fx.Node]:
        """Readers of a region node that need the whole sequence (sizes are not read)."""
        return [u for u in self.nodes[name].users if u.name not in self.sp and not reads_size(u)]

    def prune(self) -> None:
        """Drops the ops that joined only because they read a value cut to the tokens (not
        fed from a reduce-scatter through the region) and that replicated ops read whole:
        holding their tokens would cost an all-gather where there was none."""
        fed: set[str] = set()
        for n in self.nodes.values():
            if n.name in self.sp and any(a.name in fed or n.name in self.site_users.get(a.name, ())
                                         for a in n.all_input_nodes):
                fed.add(n.name)
        changed = True
        while changed:
            changed = False
            for name in [k for k in self.sp if k not in fed]:
                if any(not self.sharded_reader(u) for u in self.outside_readers(name)):
                    del self.sp[name]
                    changed = True
        self._recount_scattered()

    def _recount_scattered(self) -> None:
        self.scattered = {a.name for name in self.sp for a in _tensor_inputs(self.nodes[name])
                          if self.replicated(a) and self.with_seq(a)}

    def converted(self, v: str) -> bool:
        """A layer's partial sum all of whose users are in the region: reduce-scattered."""
        users = self.site_users.get(v)
        return bool(users) and users <= set(self.sp)

    def components(self) -> list[set[str]]:
        """Region nodes connected through each other, a shared scattered input or a shared
        partial sum."""
        parent = {k: k for k in self.sp}

        def find(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        by_input: dict[str, str] = {}
        for name in self.sp:
            for a in self.nodes[name].all_input_nodes:
                key = a.name if a.name in self.sp else None
                if key is None and (a.name in self.scattered or a.name in self.site_users):
                    key = by_input.setdefault(a.name, name)
                if key is not None:
                    parent[find(name)] = find(key)
        groups: dict[str, set[str]] = {}
        for k in self.sp:
            groups.setdefault(find(k), set()).add(k)
        return list(groups.values())

    def drop_costly(self) -> dict[str, Reason]:
        """Keeps each part of the region whose collectives send at most what the all-reduces
        it replaces send (an all-reduce moves as much as a reduce-scatter plus an all-gather
        of the same value), or at most 1/8 more than the part's cheapest layout: Megatron's,
        whose only extra is the all-gather at the model's end, for two layers or more. Other
        parts are cut down to that cheapest layout (`sequence_cut`, a minimum cut: never more
        bytes than the all-reduces); the all-reduces it keeps are returned with the reason."""
        kept: dict[str, Reason] = {}
        for comp in self.components():
            sites = sorted({v for v in self.site_users if self.converted(v)
                            and self.site_users[v] & comp}, key=self.order.__getitem__)
            whole = self._sent(comp, sites)
            reduced = 2 * sum(self.bytes(v) for v in sites)
            if whole <= reduced:
                continue
            keep = cheapest_region(
                comp, {v: self.site_users[v] for v in sites},
                lambda v: [u.name for u in self.nodes[v].users if not reads_size(u)],
                self.bytes) if sites else set()
            if whole * 8 <= self._sent(keep, sites) * 9:
                continue
            for k in comp - keep:
                del self.sp[k]
            for v in sites:
                if not self.converted(v):
                    kept[v] = Reason(f"holding the tokens of its users would send {whole} bytes "
                                     f"per token for the all-reduce's {reduced}", v)
        self._recount_scattered()
        return kept

    def _sent(self, region: set[str], sites: list[str]) -> int:
        """Bytes per token (in units of a reduce-scatter's) that `region` sends: a
        reduce-scatter of each site all of whose users it holds, an all-reduce (twice) of the
        others, an all-gather of each value it holds that something outside reads."""
        sent = 0
        for v in sites:
            sent += self.bytes(v) * (1 if self.site_users[v] <= region else 2)
        for k in region:
            if any(u.name not in region and not reads_size(u) for u in self.nodes[k].users):
                sent += self.bytes(k)
        return sent

    def bytes(self, name: str) -> int:
        return bytes_per_token(self.nodes[name].meta.get("val"))

    def reasons_kept(self) -> dict[str, Reason]:
        """Why each layer's all-reduce that is not reduce-scattered stays."""
        out = {}
        for v in self.layer_sites:
            if self.converted(v):
                continue
            if v not in self.site_users:
                out[v] = Reason(f"the partial sum has no dim of the sequence's length "
                                f"({self.input} dim 1) of its own (its tokens are merged into "
                                "one dim, or it is another sequence)", v)
                continue
            outside = sorted((u for u in self.site_users[v] if u not in self.sp),
                             key=self.order.__getitem__)
            reader = self.nodes[outside[0]] if outside else self.nodes[v]
            out[v] = Reason(f"a user needs the whole sequence: {_why_not(reader, self.symbol)}", v)
        return out

    def actions(self, found: tuple[str, int, str]) -> Actions:
        act, nodes = self.act, self.nodes
        seq = SequenceActions(input=found[0], input_dim=found[1], symbol=found[2],
                              dims=dict(sorted(self.sp.items(), key=lambda kv: self.order[kv[0]])))
        for v, users in self.site_users.items():
            if self.converted(v):
                seq.reduce_scatters[v] = (seq_dim(nodes[v].meta["val"], self.symbol),
                                          sorted(users, key=self.order.__getitem__))
        for name in seq.dims:
            n = nodes[name]
            for a in n.all_input_nodes:
                if a.name in self.sp or a.name in seq.reduce_scatters:
                    continue
                if self.with_seq(a):      # replicated, or a layer's all-reduced partial sum
                    dim, users = seq.scatters.setdefault(
                        a.name, (seq_dim(a.meta["val"], self.symbol), []))
                    if name not in users:
                        users.append(name)
            seq.local_sizes += [(name, path) for path in _size_args(n, self.symbol) or ()]
            readers = self.outside_readers(name)
            if readers:
                seq.gathers.append(SequenceGather(
                    name, seq.dims[name], tuple(u.name for u in readers),
                    tuple(u.name for u in readers if self.sharded_reader(u))))
        placements = {**act.placements,
                      **{k: SequenceShard(d) for k, d in seq.dims.items()}}
        reduces = {v: u for v, u in act.reduces.items() if v not in seq.reduce_scatters}
        return dataclasses.replace(act, placements=placements, reduces=reduces, sequence=seq)


def decide(gm: fx.GraphModule, sol: Solution) -> Solution:
    """The solution with sequence parallelism added: reduce-scatters in place of the layers'
    all-reduces, scatters and gathers (`Actions.sequence`), and, in `SequenceActions.kept`,
    why each layer's all-reduce that stays is kept."""
    found = sequence_input(gm)
    act = sol.actions
    if found is None:
        why = Reason("no input has a dynamic sequence dim (dim 1): nothing to split")
        seq = SequenceActions("", 0, "", kept={v: why for v in act.reduces})
        return dataclasses.replace(sol, actions=dataclasses.replace(act, sequence=seq))
    region = _Region(gm, act, found)
    region.grow()
    region.prune()
    costly = region.drop_costly()
    act = region.actions(found)
    act.sequence.kept = {**region.reasons_kept(), **costly}
    return dataclasses.replace(sol, actions=act)
