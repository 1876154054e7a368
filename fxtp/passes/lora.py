"""Folds LoRA branches into their base linears' local weight shards, and unfolds them again.

A branch is found from the graph, never from names: an `add` whose operands are a linear's
output (possibly plus a bias, possibly a partial sum) and `scale * B(A(x'))`, where A and B are
linears without other users and x' is the base linear's own input (the same node, looking
through Megatron's `copy_to_region`, identity ops and inactive dropout). On the tensor-parallel
graph every piece is already this rank's: beside a column-parallel base B holds the base's rows,
beside a row-parallel base A holds the base's input columns, so in both cases
`W_local += scale * B_local @ A_local` is this rank's slice of the merged weight.

Folding keeps the graph as it was (restored by `unfold_lora`) and the local base shards as they
were (copied back bit for bit: `W + d - d` is not always `W` in floating point). Both graphs
keep their generated code: an RLHF loop switches every step, and regenerating and compiling the
Python of a graph of thousands of nodes cost more than the weight arithmetic (and gave
torch.compile a new code object to compile each time).
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from ..errors import NoLoraError
from ..patterns.linear import LinearMatch, module_path
from ..rules import _DROPOUT, _IDENTITY, _VIEWS, _dropout_active
from ..runtime import GRAD_SYNC_OPS, grad_only_add
from ._util import get_tensor_attr

aten = torch.ops.aten
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_MULS = {aten.mul.Tensor, aten.mul_.Tensor}
_BIAS_ADDS = {aten.add.Tensor, grad_only_add}


@dataclass(frozen=True)
class LoraBranch:
    add: str            # the add joining base and branch
    base: str           # base linear node
    a: str              # A linear node
    b: str              # B linear node
    scale: float
    module: str


@dataclass
class GraphCode:
    """A graph with the forward `recompile()` generated from it; `install` puts both back on
    the module as `recompile()` would, without generating and compiling the code again."""
    graph: fx.Graph
    code: str
    forward: Any
    lineno_map: Any
    prologue_start: int

    @staticmethod
    def of(gm: fx.GraphModule) -> "GraphCode":
        return GraphCode(gm.graph, gm.code, type(gm).forward, gm._lineno_map, gm._prologue_start)

    def installed_on(self, gm: fx.GraphModule) -> bool:
        """Whether `gm` runs this graph's code now: every `recompile()` (after an edit, or
        `fxtp.load` retargeting devices) makes a new forward."""
        return gm.graph is self.graph and type(gm).forward is self.forward

    def install(self, gm: fx.GraphModule) -> None:
        gm._graph = self.graph
        self.graph.owning_module = gm
        gm._code, gm._lineno_map, gm._prologue_start = self.code, self.lineno_map, self.prologue_start
        type(gm).forward = self.forward


@dataclass
class FoldState:
    unfolded: GraphCode                    # restored by unfold_lora
    folded: GraphCode                      # installed by fold_lora (made by the first fold)
    branches: list[LoraBranch]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)   # base weight -> shard


def _through(n: object) -> object:
    """Looks through ops that do not change values (identity, views, inactive dropout, f)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and (
            n.target in _IDENTITY or n.target in GRAD_SYNC_OPS or n.target in _VIEWS
            or (n.target in _DROPOUT and not _dropout_active(n))):
        n = n.args[0]
    return n


def _linear_of(n: object, linears: dict[str, LinearMatch]) -> Optional[fx.Node]:
    """The linear producing `n`, looking through views and identity ops."""
    while isinstance(n, fx.Node) and n.name not in linears and n.op == "call_function" and (
            n.target in _IDENTITY or n.target in _VIEWS or n.target in _DROPOUT) and n.args:
        n = n.args[0]
    return n if isinstance(n, fx.Node) and n.name in linears else None


def _input(linear: fx.Node) -> object:
    return linear.args[1] if linear.target == aten.addmm.default else linear.args[0]


def find_lora_branches(gm: fx.GraphModule, linears: dict[str, LinearMatch]) -> list[LoraBranch]:
    """Every `base(x) + scale * B(A(x))` in the graph."""
    out = []
    for add in gm.graph.nodes:
        if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2:
            continue
        for side in (0, 1):
            base_val, branch = add.args[side], add.args[1 - side]
            hit = _match(base_val, branch, linears)
            if hit is not None:
                base, a, b, scale = hit
                out.append(LoraBranch(add.name, base.name, a.name, b.name, scale,
                                      module_path(base)))
                break
    return out


def _match(base_val, branch, linears):
    if not isinstance(branch, fx.Node) or branch.target not in _MULS:
        return None
    scales = [x for x in branch.args if isinstance(x, numbers.Number)]
    tensors = [x for x in branch.args if isinstance(x, fx.Node)]
    if len(scales) != 1 or len(tensors) != 1:
        return None
    b = _linear_of(tensors[0], linears)
    a = _linear_of(_through(_input(b)), linears) if b is not None else None
    if a is None or len(a.users) != 1 or len(b.users) != 1:
        return None
    # the base: a linear, maybe followed by its bias add
    base = base_val
    while isinstance(base, fx.Node) and base.name not in linears and base.op == "call_function" \
            and (base.target in _BIAS_ADDS or base.target in _VIEWS) \
            and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if not isinstance(base, fx.Node) or base.name not in linears or base in (a, b):
        return None
    if _through(_input(base)) is not _through(_input(a)):
        return None
    return base, a, b, float(scales[0])


def _as_out_in(t: torch.Tensor, m: LinearMatch) -> torch.Tensor:
    """A 2-D weight viewed as [out, in]."""
    return t if m.out_dim == 0 else t.t()


def fold(gm: fx.GraphModule, linears: dict[str, LinearMatch], label: str,
         previous: Optional[FoldState] = None) -> FoldState:
    """Folds every branch into its base weight and installs the graph without branches.
    `previous`: the state of an earlier fold of this graph, whose two graphs are reused when
    the module still runs the unfolded one (no edit since)."""
    if previous is not None and previous.unfolded.installed_on(gm):
        state = previous    # its saved shards' buffers too: copied into, not allocated again
    else:
        state = _fold_graph(gm, linears, label)
    weights = []
    for br in state.branches:
        mb, ma, mbase = linears[br.b], linears[br.a], linears[br.base]
        w = get_tensor_attr(gm, mbase.weight)
        if w.dim() != 2:
            raise NoLoraError(f"fxtp.fold_lora: {br.module} has a {w.dim()}-D weight; only "
                              "2-D base weights can be folded")
        weights.append((br, mbase, w, _as_out_in(get_tensor_attr(gm, mb.weight), mb),
                        _as_out_in(get_tensor_attr(gm, ma.weight), ma)))
    saved_now: set[str] = set()
    with torch.no_grad():
        for br, mbase, w, b_w, a_w in weights:
            if mbase.weight not in saved_now:      # once per weight, before any branch adds
                saved_now.add(mbase.weight)
                saved = state.originals.get(mbase.weight)
                if saved is None or saved.shape != w.shape or saved.dtype != w.dtype:
                    state.originals[mbase.weight] = w.detach().clone()
                else:
                    saved.copy_(w)
            # W += scale * B @ A in the weight's dtype, as PEFT's merge does (restored exactly
            # from the saved shard on unfold, so no rounding accumulates over rounds)
            _as_out_in(w, mbase).addmm_(b_w.to(w.dtype), a_w.to(w.dtype), alpha=br.scale)
    state.folded.install(gm)
    return state


def _fold_graph(gm: fx.GraphModule, linears: dict[str, LinearMatch], label: str) -> FoldState:
    """The graph without LoRA branches, as a copy (the module's own graph is kept for
    unfolding), with its code generated once."""
    branches = find_lora_branches(gm, linears)
    if not branches:
        raise NoLoraError(
            f"fxtp.fold_lora: no LoRA branch found in {label} (looked for base(x) + scale * "
            "B(A(x)) with A and B linears). Nothing to fold: use the graph as it is, or transform "
            "a PEFT model (peft.get_peft_model) to get adapters.")
    unfolded = GraphCode.of(gm)
    g = copy.deepcopy(gm.graph)        # same node names
    g.owning_module = gm               # dead-code elimination asks the module what is impure
    nodes = {n.name: n for n in g.nodes}
    for br in branches:
        add = nodes[br.add]
        x, y = add.args
        add.replace_all_uses_with(y if _match(y, x, linears) is not None else x)
    g.eliminate_dead_code()
    g.lint()
    gm.graph = g                       # generates and compiles the folded code, once
    folded = GraphCode.of(gm)
    unfolded.install(gm)
    return FoldState(unfolded, folded, branches)


def unfold(gm: fx.GraphModule, state: FoldState) -> None:
    with torch.no_grad():
        for name, original in state.originals.items():
            get_tensor_attr(gm, name).copy_(original)
    state.unfolded.install(gm)


def without_branches(gm: fx.GraphModule, linears: dict[str, LinearMatch], label: str) -> GraphCode:
    """Installs on `gm` its graph without LoRA branches and leaves its weights alone: for a graph
    whose base weights are folded by another graph sharing the same tensors (`tp.generate`'s
    decode step runs on `tp`'s tensors while `fold_lora(tp)` folds them). Returns the graph with
    the branches, which `GraphCode.install` puts back."""
    state = _fold_graph(gm, linears, label)
    state.folded.install(gm)
    return state.unfolded
