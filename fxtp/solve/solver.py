"""Decides the sharding of a captured graph by propagating placements through it.

Every linear whose input is replicated is tried as a column-parallel source: its output is
sharded on the feature dim. That placement is pushed forward op by op (view into heads,
transpose, rotary, softmax, sdpa, activations, ...). A linear that receives a tensor sharded on
the dim it contracts becomes row-parallel and yields a partial sum; the partial sum flows through
ops that are linear in it and is all-reduced where an op needs the full value (the residual add):
the Megatron pattern, found rather than named.

When an op cannot take a sharded input (no rule, a reduction over the sharded dim, the model's
output, a head count not divisible by the world size), every source connected to it is marked
replicated with the reason and the propagation starts again. A few ops ask instead for the source
to be split differently (a fused qkv split into thirds, kv heads fewer than ranks); the source's
split is refined and the propagation starts again. The final pass records rank-independent
actions that the rewrite passes turn into this rank's graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from ..capture.linear import _TRANSPOSES, LinearMatch, module_path, tensor_key
from ..errors import FxtpError
from ..graph.ops import (
    DROPOUT,
    NO_OUTPUT,
    PARTIAL_LINEAR_IN_FIRST,
    PARTIAL_SHAPE_OPS,
    dropout_active,
    functional_twin,
)
from .placements import REPLICATE, DimShard, Partial, Placement, Sharded
from .rules import ShardingRules, _Fail, _shape

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# results

@dataclass(frozen=True)
class Reason:
    """Why something stayed replicated."""
    text: str
    node: str = ""
    module: str = ""
    kind: str = "unsupported"      # unsupported | not_divisible | override | output | shared

    def __str__(self) -> str:
        where = f" at {self.node}" + (f" ({self.module})" if self.module else "") if self.node else ""
        return f"{self.text}{where}"


@dataclass
class Actions:
    """Rank-independent rewrite instructions, keyed by node name."""
    columns: dict[str, DimShard] = field(default_factory=dict)     # linear -> out-dim split
    rows: dict[str, DimShard] = field(default_factory=dict)        # linear -> in-dim split
    # (node, arg path, new int, or one int per rank when the split is uneven)
    int_args: list[tuple[str, tuple, Any]] = field(default_factory=list)
    # (node, arg path, block size, local block size(s)): a size computed at run time as
    # outer x block (BLOOM's batch * heads) becomes outer x local block
    sym_sizes: list[tuple[str, tuple, int, Any]] = field(default_factory=list)
    narrows: list[tuple[str, tuple, int, Optional[DimShard], DimShard]] = field(default_factory=list)
    reduces: dict[str, list[str]] = field(default_factory=dict)    # partial value -> users
    rank0_adds: list[tuple[str, str]] = field(default_factory=list)  # (add, its partial operand)
    vocab_embeddings: dict[str, DimShard] = field(default_factory=dict)  # embedding -> row split
    gathers: list[tuple[str, int, list[str]]] = field(default_factory=list)  # (value, dim, users)
    placements: dict[str, Placement] = field(default_factory=dict)
    regions: dict[str, frozenset] = field(default_factory=dict)    # node -> sources feeding it


@dataclass
class Solution:
    world_size: int
    linears: dict[str, LinearMatch]
    actions: Actions
    replicated: dict[str, Reason]          # linear node -> reason it stayed replicated
    components: list[frozenset]            # groups of sources sharded together
    iterations: int
    embedding_reasons: dict[str, Reason] = field(default_factory=dict)  # replicated lookups


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, items) -> None:
        items = list(items)
        for a in items[1:]:
            self.parent[self.find(a)] = self.find(items[0])

    def groups(self) -> list[frozenset]:
        out: dict[str, set] = {}
        for x in self.parent:
            out.setdefault(self.find(x), set()).add(x)
        return [frozenset(v) for v in out.values()]


# ---------------------------------------------------------------------------------------------
# one propagation pass

class _Pass(ShardingRules):
    def __init__(self, gm: fx.GraphModule, world_size: int, linears: dict[str, LinearMatch],
                 blocked: dict[str, Reason], source_specs: dict[str, DimShard],
                 vocab_parallel: bool = False, replicate_modules: frozenset = frozenset(),
                 eager_reduce: frozenset = frozenset()):
        self.gm, self.ws, self.linears = gm, world_size, linears
        self.eager_reduce = eager_reduce
        self.vocab_parallel = vocab_parallel
        self.blocked, self.source_specs = blocked, source_specs
        self.pl: dict[fx.Node, Any] = {}
        self.regions: dict[fx.Node, frozenset] = {}
        self.uf = _UnionFind()
        self.failures: list[tuple[frozenset, Reason]] = []
        self.refines: dict[str, DimShard] = {}
        self.actions = Actions()
        self.doomed: dict[str, Reason] = {}
        # sources whose features were viewed as a single head ([b, s, 16] -> [b, s, 1, 16]):
        # if their region fails, keeping just them replicated is tried first (MQA, as vLLM does)
        self.single_head: set[str] = set()
        self._reduced_for_current: set[fx.Node] = set()  # partial inputs all-reduced for this node
        self.embedding_reasons: dict[str, Reason] = {}
        self.replicate_modules = replicate_modules   # user overrides, by module path

    # -- helpers ---------------------------------------------------------------------------
    def placement(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            if x in self._reduced_for_current:
                return REPLICATE
            return self.pl.get(x, REPLICATE)
        return REPLICATE

    def _reduce(self, value: fx.Node, user: fx.Node) -> None:
        users = self.actions.reduces.setdefault(value.name, [])
        if user.name not in users:
            users.append(user.name)

    def _region_of(self, nodes) -> frozenset:
        out: set = set()
        for n in nodes:
            out |= self.regions.get(n, frozenset())
        return frozenset(out)

    def _refine(self, spec: Sharded, dim: int, make) -> bool:
        """Asks for the source behind `dim` to be split differently; True if it could."""
        org = spec.origin_of(dim)
        if org is None:
            return False
        src, unit = org
        # refines asked for earlier in this pass compose (q, k and v slices of one fused qkv)
        current = self.refines.get(src) or self.source_specs.get(src) or self._default_spec(src)
        new = make(current, unit)
        if new is None or new == current:
            return False
        self.refines[src] = new
        return True

    def _default_spec(self, src: str) -> DimShard:
        return DimShard(self.ws, 1, (self.linears[src].out_features,))

    # -- the pass -------------------------------------------------------------------------
    def run(self) -> None:
        for n in self.gm.graph.nodes:
            self._reduced_for_current = set()
            try:
                self._visit(n)
            except _Fail as f:
                sharded_inputs = [a for a in n.all_input_nodes if isinstance(self.placement(a), Sharded)]
                region = self._region_of(sharded_inputs)
                if n.name in self.linears and not region:
                    region = frozenset({n.name})
                self.failures.append((region, Reason(f.text, n.name, module_path(n), f.kind)))
                for a in n.all_input_nodes:
                    if isinstance(self.placement(a), Partial):
                        self._reduce(a, n)
                self.pl[n] = REPLICATE
            out = self.pl.get(n)
            if n in self.regions and self.regions[n] and (
                    isinstance(out, Sharded) or
                    (isinstance(out, (list, tuple)) and any(isinstance(o, Sharded) for o in out))):
                # sharded values meeting tie their sources together (all or none); partial sums
                # meeting do not: if one side stays replicated the other is simply reduced
                self.uf.union(self.regions[n])
            self.actions.placements[n.name] = self.pl.get(n, REPLICATE)
            if n in self.regions:
                self.actions.regions[n.name] = self.regions[n]
        failed: set = set()
        for region, _ in self.failures:
            for src in region:
                failed |= self.group_of(src)
        for src, why in self.doomed.items():
            if src not in failed:
                self.failures.append((frozenset({src}), why))

    def group_of(self, src: str) -> set:
        root = self.uf.find(src)
        return {s for s in self.uf.parent if self.uf.find(s) == root}

    def _visit(self, n: fx.Node) -> None:
        if n.op in ("placeholder", "get_attr"):
            self.pl[n] = REPLICATE
            return
        if n.op == "output":
            for a in n.all_input_nodes:
                p = self.placement(a)
                if isinstance(p, Partial):
                    self._reduce(a, n)
                elif isinstance(p, Sharded):
                    dim = self._gatherable(p)
                    if dim is None:
                        raise _Fail("a sharded value reaches the model output (the full tensor "
                                    "is needed there; vocab_parallel=True gathers it)", "output")
                    self.actions.gathers.append((a.name, dim, [n.name]))
            return
        ins = n.all_input_nodes
        for a in ins:
            if a.name in self.eager_reduce and isinstance(self.pl.get(a), Partial):
                # this partial sum is all-reduced for another user anyway: use the full value
                self._reduce(a, n)
                self._reduced_for_current.add(a)
        placements = [self.placement(a) for a in ins]
        if self.vocab_parallel and n.target == aten.embedding.default and all(
                p is REPLICATE for p in placements):
            self._embedding(n)
            return
        if n.name in self.linears:
            self._linear(n)
            return
        if all(p is REPLICATE for p in placements):
            self.pl[n] = REPLICATE
            return
        if n.op != "call_function":
            raise _Fail(f"{n.op} {n.target} receives a sharded value and fxtp has no rule for it")
        self.regions[n] = self._region_of(ins)
        target = n.target
        # partial sums flow through ops that are linear in them; elsewhere they are reduced
        if any(isinstance(p, Partial) for p in placements):
            if self._partial_rule(n, placements):
                return
            for a, p in zip(ins, placements):
                if isinstance(p, Partial):
                    self._reduce(a, n)
                    self._reduced_for_current.add(a)
            if any(isinstance(p, Sharded) for p in placements):
                self._bottleneck_sources(n, ins)
            placements = [REPLICATE if isinstance(p, Partial) else p for p in placements]
            if all(p is REPLICATE for p in placements):
                self.pl[n] = REPLICATE
                self.regions.pop(n, None)
                return
            # a reduced partial sum is a full value here: its region is not joined to this one
            self.regions[n] = self._region_of([a for a in ins if a not in self._reduced_for_current])
        self.pl[n] = self._sharded_rule(n, functional_twin(target))

    # -- vocab parallel (plan option) -------------------------------------------------------
    def _gatherable(self, p: Sharded) -> Optional[int]:
        """The dim to all-gather a sharded model output on, when vocab_parallel allows it."""
        if not self.vocab_parallel or len(p.dims) != 1:
            return None
        dim, ds = p.dims[0]
        if len(ds.chunks) != 1 or not ds.disjoint(self.ws) or not ds.even() or ds.outer:
            return None
        return dim

    def _weight_users(self, attr: fx.Node) -> list[fx.Node]:
        """The ops using a parameter under any of its names, looking through transposes."""
        key = tensor_key(self.gm, attr.target)
        stack = [u for a in self.gm.graph.nodes
                 if a.op == "get_attr" and tensor_key(self.gm, a.target) == key for u in a.users]
        out = []
        while stack:
            u = stack.pop()
            if u.op == "call_function" and u.target in _TRANSPOSES:
                stack.extend(u.users)
            else:
                out.append(u)
        return out

    def _tied_only_to_embeddings(self, n: fx.Node) -> bool:
        attr = next(a for a in self.gm.graph.nodes
                    if a.op == "get_attr" and a.target == self.linears[n.name].weight)
        return all(u is n or u.target == aten.embedding.default
                   for u in self._weight_users(attr))

    def _embedding(self, n: fx.Node) -> None:
        """A lookup in a vocab-sharded table: each rank holds rows [start, end), the masked
        lookup is a partial sum."""
        w = n.args[0]
        self.pl[n] = REPLICATE
        val = w.meta.get("val") if isinstance(w, fx.Node) else None
        if w.op != "get_attr" or val is None or val.dim() != 2:
            return
        vocab = int(val.shape[0])
        owner = w.target.rsplit(".", 1)[0]
        if any(owner == m or owner.startswith(m + ".") for m in self.replicate_modules) \
                or vocab % self.ws:
            if vocab % self.ws:
                self.embedding_reasons[n.name] = Reason(
                    f"vocab of {vocab} rows cannot be split into {self.ws} equal parts",
                    n.name, owner, "unsupported")
            return
        for u in self._weight_users(w):
            if u is n or u.target == aten.embedding.default:
                continue
            if u.name in self.linears and u.name not in self.blocked \
                    and self.linears[u.name].out_dim == 0:
                continue  # a tied output projection, column-parallel on the same rows
            self.embedding_reasons[n.name] = Reason(
                f"its table {w.target} is also used by {u.name}, which is not vocab-parallel",
                n.name, owner, "shared")
            return
        self.actions.vocab_embeddings[n.name] = DimShard(self.ws, 1, (vocab,))
        self.pl[n] = Partial()

    # -- partial sums ---------------------------------------------------------------------
    def _partial_rule(self, n: fx.Node, placements: list) -> bool:
        t = functional_twin(n.target)
        kinds = [type(p) for p in placements]
        tensors = [a for a in n.args if isinstance(a, fx.Node)]
        if t in NO_OUTPUT:  # metadata checks: dtype/device hold for a partial sum too
            self.pl[n] = REPLICATE
            return True
        if t in PARTIAL_SHAPE_OPS or (t in DROPOUT and not dropout_active(n)):
            if len(tensors) == 1 and Sharded not in kinds:
                self.pl[n] = Partial()
                return True
            return False
        if t in (aten.add.Tensor, aten.sub.Tensor) and len(tensors) == 2 and all(k is Partial for k in kinds):
            self.pl[n] = Partial()
            return True
        if (t == aten.add.Tensor and len(tensors) == 2 and kinds.count(Partial) == 1
                and Sharded not in kinds and not n.kwargs):
            # a constant (bias) added to a partial sum: rank 0 adds it, the others skip the add,
            # so parallel branches (attention + MLP) still share one all-reduce
            part, const = (tensors[0], tensors[1]) if isinstance(self.placement(tensors[0]), Partial) \
                else (tensors[1], tensors[0])
            if const.op == "get_attr" and str(_shape(part)) == str(_shape(n)):
                self.actions.rank0_adds.append((n.name, part.name))
                self.pl[n] = Partial()
                return True
        if t in PARTIAL_LINEAR_IN_FIRST and Sharded not in kinds and kinds.count(Partial) == 1 \
                and isinstance(self.placement(n.args[0]), Partial):
            # gathering rows, summing or slicing a partial sum commutes with the all-reduce
            self.pl[n] = Partial()
            return True
        if t in (aten.mul.Tensor, aten.div.Tensor, aten.neg.default) and Sharded not in kinds:
            if kinds.count(Partial) == 1 and (t != aten.div.Tensor or isinstance(self.placement(n.args[0]), Partial)):
                self.pl[n] = Partial()
                return True
        return False

    # -- low-rank branches (LoRA), found from the placements -------------------------------
    def _partial_meets_partial(self, n: fx.Node) -> bool:
        """True when `n`'s output, kept a partial sum, reaches (through ops linear in it, one
        user each) an add whose other operand is already a partial sum: then it can share that
        sum's all-reduce instead of needing its own."""
        cur = n
        for _ in range(16):
            if len(cur.users) != 1:
                return False
            u = next(iter(cur.users))
            t = functional_twin(u.target) if u.op == "call_function" else None
            if t in (aten.add.Tensor, aten.sub.Tensor):
                others = [a for a in u.args if isinstance(a, fx.Node) and a is not cur]
                return len(others) == 1 and isinstance(self.pl.get(others[0]), Partial)
            scalar_mul = t in (aten.mul.Tensor, aten.div.Tensor) and not any(
                isinstance(a, fx.Node) and a is not cur for a in u.args)
            if not (t in PARTIAL_SHAPE_OPS or scalar_mul
                    or (t in DROPOUT and not dropout_active(u))):
                return False
            cur = u
        return False

    def _bottleneck_sources(self, n: fx.Node, ins: list) -> None:
        """A partial sum about to be all-reduced only to meet a sharded value at `n`: if it comes
        from a row-parallel linear fed by narrower column sources (x -> A -> B, a low-rank
        branch beside a column-parallel base), those sources are better replicated. Then B
        becomes column-parallel beside the base and no all-reduce is needed (LoRA's A stays
        whole, B is split like the base)."""
        for a in ins:
            if not isinstance(self.pl.get(a), Partial):
                continue
            row = a
            while row.name not in self.actions.rows and row.op == "call_function" and row.args \
                    and isinstance(row.args[0], fx.Node) and isinstance(self.pl.get(row.args[0]), Partial):
                row = row.args[0]
            if row.name not in self.actions.rows:
                continue
            sources = self.regions.get(row, frozenset())
            out = self.linears[row.name].out_features
            if sources and all(self.linears[s].out_features < out for s in sources):
                self.failures.append((sources, Reason(
                    f"low-rank branch: its {self.linears[row.name].module} output would be "
                    f"all-reduced only to meet a sharded value at {n.name}; kept whole so that "
                    f"{self.linears[row.name].module} is split like the value it joins",
                    row.name, module_path(row), "bottleneck")))

    # -- linears --------------------------------------------------------------------------
    def _linear(self, n: fx.Node) -> None:
        m = self.linears[n.name]
        x = n.args[0]
        xp = self.placement(x)
        if isinstance(xp, Partial) and self._partial_meets_partial(n):
            # a replicated weight applied to a partial sum gives a partial sum (the linear has
            # no bias here: biases were split off); it joins another partial sum downstream and
            # shares its all-reduce (LoRA's B beside a row-parallel base)
            self.regions[n] = self._region_of([x])
            self.pl[n] = Partial()
            return
        if isinstance(xp, Partial):
            self._reduce(x, n)
            xp = REPLICATE
        if xp is REPLICATE:
            self.pl[n] = REPLICATE
            if n.name in self.blocked:
                return
            if not m.exclusive and not (self.vocab_parallel and self._tied_only_to_embeddings(n)):
                self.blocked[n.name] = Reason(f"weight {m.weight} is shared with another op (tied)",
                                              n.name, m.module, "shared")
                return
            spec = self.source_specs.get(n.name) or self._default_spec(n.name)
            if m.out_features < self.ws:
                self.blocked[n.name] = Reason(
                    f"{m.out_features} output feature(s), fewer than the {self.ws} ranks",
                    n.name, m.module, "too_small")
                return
            if not spec.valid():
                # Propagate a stand-in split (one part) to learn whether the region could be
                # sharded at all: if it fails anyway (say, it reaches the model output) that
                # reason is reported; if not, the uneven split is.
                self.doomed[n.name] = Reason(
                    f"{m.out_features} output features of {m.module} cannot be shared out "
                    f"over {spec.parts} ranks in whole units", n.name, m.module, "not_divisible")
                spec = DimShard(1, self.ws, spec.chunks)
            out_rank = len(_shape(n))
            self.regions[n] = frozenset({n.name})
            self.actions.columns[n.name] = spec
            self.pl[n] = Sharded.of({out_rank - 1: spec}, {out_rank - 1: (n.name, 1)})
            return
        # the activation is sharded
        self.regions[n] = self._region_of([x])
        rank = len(_shape(x))
        contraction = xp.get(rank - 1)
        if contraction is None:
            # sharded on batch-like dims only: a replicated weight keeps that placement
            self.pl[n] = Sharded.of(xp.as_dict())
            return
        if len(xp.dims) > 1:
            raise _Fail("input is sharded on the contracted dim and another dim")
        if contraction.outer:
            raise _Fail("contracts a dim holding a sharded block inside an outer dim")
        if n.name in self.blocked and self.blocked[n.name].kind == "override":
            raise _Fail(f"user override keeps {m.module} replicated", "override")
        if not m.exclusive:
            raise _Fail(f"weight {m.weight} is shared with another op, its input dim cannot be "
                        "split", "shared")
        if not contraction.disjoint(self.ws):
            # ranks that share a piece (replicated kv groups) would add it twice: each rank
            # keeps a disjoint part of the features it holds before contracting them
            want = DimShard(self.ws, 1, contraction.chunks)
            if not (want.valid() and contraction.covers(want, self.ws)):
                raise _Fail(f"its {contraction.size} input features cannot be split into "
                            f"{self.ws} disjoint parts, each inside what a rank holds, for a "
                            "row-parallel sum", "not_divisible")
            self.actions.narrows.append((n.name, (0,), rank - 1, contraction, want))
            contraction = want
        self.actions.rows[n.name] = contraction
        self.pl[n] = Partial()

# ---------------------------------------------------------------------------------------------

def solve(gm: fx.GraphModule, world_size: int, linears: dict[str, LinearMatch],
          overrides: Optional[dict[str, Reason]] = None, max_iterations: int = 200,
          vocab_parallel: bool = False, replicate_modules: frozenset = frozenset()) -> Solution:
    """Finds the sharding: runs propagation passes until no region fails or needs refining.

    A pass that asks for refined source splits only applies those (its failures may stem from
    the old splits and are found again if real). Otherwise each failed region is blocked, whole,
    except that sources seen as a single head are first tried replicated on their own.
    """
    blocked: dict[str, Reason] = dict(overrides or {})
    source_specs: dict[str, DimShard] = {}
    eager_reduce: set[str] = set()
    refined_count: dict[str, int] = {}
    for it in range(1, max_iterations + 1):
        p = _Pass(gm, world_size, linears, blocked, source_specs, vocab_parallel, replicate_modules,
                  frozenset(eager_reduce))
        p.run()
        real = [(reg, why) for reg, why in p.failures if why.kind != "refine"]
        if not real and not p.refines and not set(p.actions.reduces) <= eager_reduce:
            # a partial sum reduced for one user serves all its users: no second reduction later
            eager_reduce |= set(p.actions.reduces)
            continue
        if not real and not p.refines:
            return Solution(world_size, linears, p.actions,
                            {k: v for k, v in blocked.items() if k in linears},
                            p.uf.groups(), it, p.embedding_reasons)
        if p.refines:
            for src, spec in p.refines.items():
                refined_count[src] = refined_count.get(src, 0) + 1
                if refined_count[src] > 8:
                    blocked[src] = Reason("its split could not be settled", src, linears[src].module)
                else:
                    source_specs[src] = spec
            continue
        for region, why in real:
            group: set = set(region)
            for src in region:
                group |= p.group_of(src)
            single = {s for s in group & p.single_head if s not in blocked}
            if single and why.kind != "override":
                for src in single:
                    blocked[src] = Reason(
                        "its features form a single head, fewer than the ranks: kept whole on "
                        "every rank (MQA kv replicated, as vLLM does)", src, linears[src].module,
                        "single_head")
                continue
            for src in group:
                blocked.setdefault(src, why)
    raise FxtpError(f"fxtp: sharding propagation did not settle in {max_iterations} passes; "
                    "please report the model (a plan override can keep the offending modules "
                    "replicated)")


def sliced_in_place(value: fx.Node, have: DimShard | None, want: DimShard) -> bool:
    """A parameter or buffer read only here, whole, by a plain (not outer) split: its stored
    tensor is replaced by this rank's slice instead of slicing it at run time."""
    return value.op == "get_attr" and len(value.users) == 1 and have is None and not want.outer
