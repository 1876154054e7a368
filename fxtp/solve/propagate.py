"""One propagation pass: placements pushed forward through the graph in node order.

Every linear whose input is replicated becomes a column-parallel source; a linear receiving a
value sharded on the dim it contracts becomes row-parallel and yields a partial sum; every other
op reading a sharded value or a partial sum is handed to its rule (see registry.py). A pass
records the failures (by region of sources), the refined source splits asked for, and the
actions; `solver.solve` repeats passes until none fails.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from ..capture.linear import LinearMatch, module_path, tensor_key
from ..graph.ops import TRANSPOSES, functional_twin
from . import (
    rules_along,
    rules_compute,
    rules_einsum,
    rules_partial,
    rules_shape,
    rules_slicing,
)
from .lowrank import bottleneck_failures, joins_partial_sum
from .placements import REPLICATE, DimShard, Partial, Sharded
from .records import Actions, Failure, Gather, Narrow, Reason, ReasonKind
from .registry import (
    DECLINED,
    PARTIAL_RULES,
    MakeSplit,
    RuleContext,
    RuleFailure,
    sharded_placement,
)
from .shapes import node_shape
from .splits import ranks_that_fit, refine_within

aten = torch.ops.aten

# the modules whose rules fill SHARDED_RULES and PARTIAL_RULES (imported for that)
RULE_MODULES = (rules_shape, rules_slicing, rules_compute, rules_along, rules_einsum,
                rules_partial)


class UnionFind:
    """Sources tied together (sharded values meeting): all sharded, or none."""

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


class Propagation:
    """One pass over the graph (build it, call `run()`, then read its fields)."""

    def __init__(self, gm: fx.GraphModule, world_size: int, linears: dict[str, LinearMatch],
                 blocked: dict[str, Reason], source_specs: dict[str, DimShard],
                 vocab_parallel: bool = False, replicate_modules: frozenset = frozenset(),
                 eager_reduce: frozenset = frozenset(), partial_statistics: bool = True):
        self.gm, self.ws, self.linears = gm, world_size, linears
        self.eager_reduce = eager_reduce
        self.vocab_parallel = vocab_parallel
        self.blocked, self.source_specs = blocked, source_specs
        self.pl: dict[fx.Node, Any] = {}
        self.regions: dict[fx.Node, frozenset] = {}
        self.uf = UnionFind()
        self.failures: list[Failure] = []
        self.refines: dict[str, DimShard] = {}
        self.actions = Actions()
        self.doomed: dict[str, Reason] = {}
        # sources whose features were viewed as a single head ([b, s, 16] -> [b, s, 1, 16]):
        # if their region fails, keeping just them replicated is tried first (MQA, as vLLM does)
        self.single_head: set[str] = set()
        self._reduced_for_current: set[fx.Node] = set()  # partial inputs all-reduced for this node
        self.embedding_reasons: dict[str, Reason] = {}
        self.replicate_modules = replicate_modules   # user overrides, by module path
        self.ctx = RuleContext(gm, world_size, self.actions, self.placement, self.refine,
                               self.single_head, partial_statistics,
                               lambda source: self._default_spec(source).size)

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

    def refine(self, spec: Sharded, dim: int, make: MakeSplit) -> bool:
        """Asks for the source behind `dim` to be split differently; True if it could."""
        org = spec.origin_of(dim)
        if org is None:
            return False
        src = org.source
        # refines asked for earlier in this pass compose (q, k and v slices of one fused qkv)
        current = self.refines.get(src) or self.source_specs.get(src) or self._default_spec(src)
        new = refine_within(current, org.offset, spec.get(dim).size * org.unit,
                            lambda part: make(part, org.unit))
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
            except RuleFailure as f:
                sharded_inputs = [a for a in n.all_input_nodes if isinstance(self.placement(a), Sharded)]
                region = self._region_of(sharded_inputs)
                if n.name in self.linears and not region:
                    region = frozenset({n.name})
                self.failures.append(Failure(region, Reason(f.text, n.name, module_path(n), f.kind)))
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
                self.failures.append(Failure(frozenset({src}), why))

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
                        raise RuleFailure("a sharded value reaches the model output (the full "
                                          "tensor is needed there; vocab_parallel=True gathers "
                                          "it)", ReasonKind.OUTPUT)
                    self.actions.gathers.append(Gather(a.name, dim, [n.name]))
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
            if any(a in self.ctx.whole_pieces for a in ins):
                self.ctx.whole_pieces.add(n)
            return
        if n.op != "call_function":
            raise RuleFailure(f"{n.op} {n.target} receives a sharded value and fxtp has no rule "
                              "for it")
        self.regions[n] = self._region_of(ins)
        target = functional_twin(n.target)
        # partial sums flow through ops that are linear in them; elsewhere they are reduced
        if any(isinstance(p, Partial) for p in placements):
            out = PARTIAL_RULES.apply(self.ctx, n, target)
            if out is not DECLINED:
                self.pl[n] = out
                return
            for a, p in zip(ins, placements):
                if isinstance(p, Partial):
                    self._reduce(a, n)
                    self._reduced_for_current.add(a)
            if any(isinstance(p, Sharded) for p in placements):
                self.failures += bottleneck_failures(n, ins, self.pl, self.actions, self.regions,
                                                     self.linears)
            placements = [REPLICATE if isinstance(p, Partial) else p for p in placements]
            if all(p is REPLICATE for p in placements):
                self.pl[n] = REPLICATE
                self.regions.pop(n, None)
                return
            # a reduced partial sum is a full value here: its region is not joined to this one
            self.regions[n] = self._region_of([a for a in ins if a not in self._reduced_for_current])
        self.pl[n] = sharded_placement(self.ctx, n, target)
        if self.pl[n] is REPLICATE:
            self.ctx.whole_pieces.add(n)

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
            if u.op == "call_function" and u.target in TRANSPOSES:
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
                    n.name, owner, ReasonKind.UNSUPPORTED)
            return
        for u in self._weight_users(w):
            if u is n or u.target == aten.embedding.default:
                continue
            if u.name in self.linears and u.name not in self.blocked \
                    and self.linears[u.name].out_dim == 0:
                continue  # a tied output projection, column-parallel on the same rows
            self.embedding_reasons[n.name] = Reason(
                f"its table {w.target} is also used by {u.name}, which is not vocab-parallel",
                n.name, owner, ReasonKind.SHARED)
            return
        self.actions.vocab_embeddings[n.name] = DimShard(self.ws, 1, (vocab,))
        self.pl[n] = Partial()

    # -- linears --------------------------------------------------------------------------
    def _linear(self, n: fx.Node) -> None:
        m = self.linears[n.name]
        x = n.args[0]
        xp = self.placement(x)
        if isinstance(xp, Partial) and joins_partial_sum(n, self.pl):
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
            self._column_source(n, m)
            return
        # the activation is sharded
        self.regions[n] = self._region_of([x])
        rank = len(node_shape(x))
        contraction = xp.get(rank - 1)
        if contraction is None:
            # sharded on batch-like dims only: a replicated weight keeps that placement
            self.pl[n] = Sharded.of(xp.as_dict())
            return
        if len(xp.dims) > 1:
            raise RuleFailure("input is sharded on the contracted dim and another dim")
        if contraction.outer:
            raise RuleFailure("contracts a dim holding a sharded block inside an outer dim")
        if n.name in self.blocked and self.blocked[n.name].kind == ReasonKind.OVERRIDE:
            raise RuleFailure(f"user override keeps {m.module} replicated", ReasonKind.OVERRIDE)
        if not m.exclusive:
            raise RuleFailure(f"weight {m.weight} is shared with another op, its input dim "
                              "cannot be split", ReasonKind.SHARED)
        if not contraction.disjoint(self.ws):
            # ranks that share a piece (replicated kv groups) would add it twice: each rank
            # keeps a disjoint part of the features it holds before contracting them
            want = DimShard(self.ws, 1, contraction.chunks)
            if not (want.valid() and contraction.covers(want, self.ws)):
                raise RuleFailure(f"its {contraction.size} input features cannot be split into "
                                  f"{self.ws} disjoint parts, each inside what a rank holds, "
                                  "for a row-parallel sum", ReasonKind.NOT_DIVISIBLE)
            self.actions.narrows.append(Narrow(n.name, (0,), rank - 1, contraction, want))
            contraction = want
        self.actions.rows[n.name] = contraction
        self.pl[n] = Partial()

    def _column_source(self, n: fx.Node, m: LinearMatch) -> None:
        """A linear reading a replicated value: column-parallel unless blocked, tied or too
        small."""
        self.pl[n] = REPLICATE
        if n.name in self.blocked:
            return
        if not m.exclusive and not (self.vocab_parallel and self._tied_only_to_embeddings(n)):
            self.blocked[n.name] = Reason(f"weight {m.weight} is shared with another op (tied)",
                                          n.name, m.module, ReasonKind.SHARED)
            return
        spec = self.source_specs.get(n.name) or self._default_spec(n.name)
        if m.out_features < self.ws:
            self.blocked[n.name] = Reason(
                f"{m.out_features} output feature(s), fewer than the {self.ws} ranks",
                n.name, m.module, ReasonKind.TOO_SMALL)
            return
        if not spec.valid():
            # Propagate a stand-in split (one part) to learn whether the region could be
            # sharded at all: if it fails anyway (say, it reaches the model output) that
            # reason is reported; if not, the uneven split is.
            self.doomed[n.name] = Reason(
                f"{m.out_features} output features of {m.module} cannot be shared out "
                f"over {spec.parts} ranks in whole units; "
                f"{ranks_that_fit(min(c.units for c in spec.splits), 'units')}", n.name, m.module,
                ReasonKind.NOT_DIVISIBLE)
            spec = DimShard(1, self.ws, spec.chunks)
        out_rank = len(node_shape(n))
        self.regions[n] = frozenset({n.name})
        self.actions.columns[n.name] = spec
        self.pl[n] = Sharded.of({out_rank - 1: spec}, {out_rank - 1: (n.name, 1)})
