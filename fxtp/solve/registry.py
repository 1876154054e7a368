"""The rule registry: which function says how a value passes through an aten op, and what such a
function may read and record.

Rules are registered per op in a `RuleBook` (`@SHARDED_RULES.rule(aten.view.default, ...)`), so
adding an op is adding a function, not a branch in a long if-chain. A book holds at most one
rule per op (a second registration is an error, so op rules never shadow each other); tag rules
(`@SHARDED_RULES.tag_rule(is_pointwise)`) are tried, in registration order, after the op's own
rule or when it has none. A rule returns a placement, or `DECLINED` to say "not this case" (the
op is then treated as if it had no op rule), or raises `RuleFailure`.

Rules see the propagation only through a `RuleContext`: the placements so far, the actions being
recorded, the world size, and a way to ask for a source to be split differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx

from .placements import DimShard, Sharded
from .records import Actions, ReasonKind
from .shapes import node_shape
from .splits import whole_chunks


class RuleFailure(Exception):
    """An op cannot take the placement it receives (`kind` says why; REFINE: the source was
    asked to be split differently and the pass is to start again)."""

    def __init__(self, text: str, kind: ReasonKind = ReasonKind.UNSUPPORTED):
        super().__init__(text)
        self.text, self.kind = text, ReasonKind(kind)


# make(current source split, source features per element of the dim) -> the new split or None
MakeSplit = Callable[[DimShard, int], Optional[DimShard]]


@dataclass
class RuleContext:
    """What a rule may read and record during one propagation pass.

    `placement(x)`: the placement of a node (REPLICATE for non-nodes and for partial sums already
    reduced for the node being visited). `actions`: where rules append size rewrites and
    narrows. `refine(spec, dim, make)`: asks for the source behind `dim` of `spec` to be split as
    `make` says; True if that changes its split. `single_head`: sources seen viewed as a single
    head (the solver tries keeping just them replicated first). `gm`: the graph module, to read
    constant index tensors. `partial_statistics`: a sum or mean over a sharded dim may give a
    partial sum (else it fails, and its region stays replicated). `source_features`: the
    output features of a column source, by name. `whole_pieces`: replicated values made from
    sharded ones (Mamba-2's `C @ B` over a state every rank holds whole), not a residual
    stream.
    """

    gm: fx.GraphModule
    world_size: int
    actions: Actions
    placement: Callable[[Any], Any]
    refine: Callable[[Sharded, int, MakeSplit], bool]
    single_head: set
    partial_statistics: bool = True
    source_features: Callable[[str], int] = lambda source: 0
    whole_pieces: set = field(default_factory=set)
    _from_inputs: Optional[set] = field(default=None, repr=False)

    def from_inputs(self, value: Any) -> bool:
        """Whether `value` is computed from the model's inputs (not only from parameters,
        buffers and constants: `D[:, None]`)."""
        if self._from_inputs is None:
            self._from_inputs = set()
            for n in self.gm.graph.nodes:
                if n.op == "placeholder" or any(a in self._from_inputs for a in n.all_input_nodes):
                    self._from_inputs.add(n)
        return value in self._from_inputs

    def whole_source(self, spec: Sharded, dim: int) -> bool:
        """Whether `dim` of `spec` is all of its column source's features, not a piece that a
        split cut from it (B inside Mamba's fused in_proj)."""
        org = spec.origin_of(dim)
        return (org is not None and org.offset == 0
                and spec.get(dim).size * org.unit == self.source_features(org.source))

    def hold_whole(self, spec: Sharded, dim: int) -> None:
        """An op needs `dim` of `spec` whole (a contraction, SDPA's head dim): when it is a
        piece of a fused source (MQA's one k head, Mamba-2's B), asks for that piece to be
        held whole on every rank (a refine); the caller then fails for this pass."""
        if not self.whole_source(spec, dim):
            self.refine_or_fail(spec, dim, lambda cur, _u: whole_chunks(cur, [(0, cur.size)]))

    def sharded(self, x: Any) -> Sharded:
        """The placement of `x`, which must be sharded."""
        sp = self.placement(x)
        if not isinstance(sp, Sharded):
            raise RuleFailure("expected a sharded input")
        return sp

    def sharded_input(self, n: fx.Node) -> tuple[fx.Node, Sharded, list]:
        """`n`'s first argument, its (sharded) placement and its shape."""
        x = n.args[0]
        return x, self.sharded(x), node_shape(x)

    def refine_or_fail(self, spec: Sharded, dim: int, make: MakeSplit) -> None:
        """Asks for a refined source split; when granted the pass cannot go on with this one."""
        if self.refine(spec, dim, make):
            raise RuleFailure("source split refined", ReasonKind.REFINE)


Rule = Callable[[RuleContext, fx.Node], Any]
DECLINED = object()   # returned by a rule: not this case, try the tag rules


class RuleBook:
    """Rules of one kind, by op, then by tag (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self.by_op: dict[Any, Rule] = {}
        self.by_tag: list[tuple[Callable[[Any], bool], Rule]] = []

    def rule(self, *ops) -> Callable[[Rule], Rule]:
        """Registers the decorated function as the rule of `ops` (aten overloads, or
        operator.getitem)."""
        def register(fn: Rule) -> Rule:
            for op in ops:
                if op in self.by_op:
                    raise ValueError(f"{self.name} rules: {op} already has "
                                     f"{self.by_op[op].__name__}")
                self.by_op[op] = fn
            return fn
        return register

    def tag_rule(self, matches: Callable[[Any], bool]) -> Callable[[Rule], Rule]:
        """Registers the decorated function for every op `matches(op)` accepts."""
        def register(fn: Rule) -> Rule:
            self.by_tag.append((matches, fn))
            return fn
        return register

    def apply(self, ctx: RuleContext, n: fx.Node, target: Any) -> Any:
        """The placement of `n`'s output by the first rule that takes it, or DECLINED."""
        fn = self.by_op.get(target)
        if fn is not None:
            out = fn(ctx, n)
            if out is not DECLINED:
                return out
        for matches, fn in self.by_tag:
            if matches(target):
                out = fn(ctx, n)
                if out is not DECLINED:
                    return out
        return DECLINED


# ops receiving a sharded value (`target` is the functional twin of an in-place op)
SHARDED_RULES = RuleBook("sharded")
# ops receiving a partial sum: DECLINED means the sum is all-reduced before the op
PARTIAL_RULES = RuleBook("partial")


def sharded_placement(ctx: RuleContext, n: fx.Node, target: Any) -> Any:
    """The placement of `n`, which reads a sharded value; RuleFailure when no rule takes it."""
    before = len(ctx.actions.narrows)
    out = SHARDED_RULES.apply(ctx, n, target)
    if out is DECLINED:
        raise RuleFailure(f"no sharding rule for {getattr(target, '__name__', target)}; the "
                          "value it reads is sharded")
    if n.target is not target:
        _check_written_whole(ctx, n, ctx.actions.narrows[before:])
    return out


def sliced_in_place(value: fx.Node, have: DimShard | None, want: DimShard) -> bool:
    """A parameter or buffer read only here, whole, by a plain (not outer) split: its stored
    tensor is replaced by this rank's slice instead of slicing it at run time."""
    return value.op == "get_attr" and len(value.users) == 1 and have is None and not want.outer


def _check_written_whole(ctx: RuleContext, n: fx.Node, narrows: list) -> None:
    """An in-place op (`dst.copy_(src)`, `dst.add_(src)`) writes into the tensor it is given:
    slicing `dst` to the split of a sharded `src` would write into a temporary slice, and the
    tensor read afterwards (HY-V4's `key_states[..., 16:].copy_(k_rot)`) would keep garbage.
    So `dst` must take `src` as it is. Asks for a sharded `src` piece of a fused source to be
    held whole (MLA's shared rope key, a slice of `kv_a_proj`); else fails, so the region
    stays replicated."""
    dst = n.args[0]
    cut = {nw.dim for nw in narrows if nw.user == n.name and nw.path == (0,)
           and not sliced_in_place(dst, nw.have, nw.want)}
    if not cut:
        return
    out = node_shape(n)
    for a in n.all_input_nodes:
        spec, shape = ctx.placement(a), node_shape(a)
        if a is dst or not isinstance(spec, Sharded) or shape is None or out is None:
            continue
        for d, _ in spec.dims:
            if d + len(out) - len(shape) in cut:
                ctx.hold_whole(spec, d)
    raise RuleFailure(f"{getattr(n.target, '__name__', n.target)} writes a sharded value in "
                      f"place into {dst.name}, which is replicated (it cannot be sliced in place)")
