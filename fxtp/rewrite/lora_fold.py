"""Folds LoRA branches into their base linears' local weight shards, and unfolds them again.

The branches are those `capture/lora.py` finds. On the tensor-parallel graph every piece of a
branch is already this rank's: beside a column-parallel base B holds the base's rows,
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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx

from ..capture.linear import LinearMatch
from ..capture.lora import LoraBranch, find_lora_branches, match_branch
from ..errors import LoraFoldError, NoLoraError
from ..graph.nodes import get_tensor_attr

aten = torch.ops.aten


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
    weights = [(br, linears[br.base], _base_weight(gm, br, linears)) for br in state.branches]
    saved_now: set[str] = set()
    with torch.no_grad():
        for br, mbase, w in weights:
            if mbase.weight not in saved_now:      # once per weight, before any branch adds
                saved_now.add(mbase.weight)
                saved = state.originals.get(mbase.weight)
                if saved is None or saved.shape != w.shape or saved.dtype != w.dtype:
                    state.originals[mbase.weight] = w.detach().clone()
                else:
                    saved.copy_(w)
            _add_branch(gm, w, br, linears)
    state.folded.install(gm)
    return state


def _base_weight(gm: fx.GraphModule, br: LoraBranch, linears: dict[str, LinearMatch]
                 ) -> torch.Tensor:
    w = get_tensor_attr(gm, linears[br.base].weight)
    if w.dim() != 2:
        raise LoraFoldError(f"fxtp.fold_lora: {br.module} has a {w.dim()}-D weight; only "
                            "2-D base weights can be folded")
    return w


def _add_branch(gm: fx.GraphModule, w: torch.Tensor, br: LoraBranch,
                linears: dict[str, LinearMatch]) -> None:
    """W += scale * B @ A in the weight's dtype, as PEFT's merge does (restored exactly from
    the saved shard on unfold, so no rounding accumulates over rounds)."""
    mb, ma = linears[br.b], linears[br.a]
    b_w = _as_out_in(get_tensor_attr(gm, mb.weight), mb)
    a_w = _as_out_in(get_tensor_attr(gm, ma.weight), ma)
    with torch.no_grad():
        _as_out_in(w, linears[br.base]).addmm_(b_w.to(w.dtype), a_w.to(w.dtype), alpha=br.scale)


def merged_weights(gm: fx.GraphModule, linears: dict[str, LinearMatch], label: str
                   ) -> tuple[dict[str, Callable[[], torch.Tensor]], set[str]]:
    """What `fold` would write into each base weight, made on demand without touching `gm`:
    base weight name -> a function returning a new tensor, this rank's shard of
    W + sum of scale * B @ A over its branches (fxtp.save(merged=True) writes one tensor at a
    time). Also the names of the branches' A and B weights, which the merge consumes."""
    branches = find_lora_branches(gm, linears)
    if not branches:
        raise NoLoraError(f"fxtp.save(merged=True): no LoRA branch found in {label}: there "
                          "is nothing to merge; save without merged=True")
    by_weight: dict[str, list[LoraBranch]] = {}
    consumed: set[str] = set()
    for br in branches:
        _base_weight(gm, br, linears)
        by_weight.setdefault(linears[br.base].weight, []).append(br)
        consumed |= {linears[br.a].weight, linears[br.b].weight}

    def merged(name: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            w = get_tensor_attr(gm, name).detach().clone()
            for br in by_weight[name]:
                _add_branch(gm, w, br, linears)
            return w
        return make

    return {name: merged(name) for name in by_weight}, consumed


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
        add.replace_all_uses_with(y if match_branch(y, x, linears) is not None else x)
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
