"""The sharding plan: what fxtp decided for every linear, why, and which collectives it costs.

A Plan is computed from the captured graph without any process group, prints as a table, turns
into a dict/JSON, and can be overridden per module before `fxtp.transform(..., plan=plan)`.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch import fx

from .capture import Captured
from .errors import PlanOverrideError
from .patterns.linear import module_path
from .rules import _SDPA, _SOFTMAX
from .solver import Reason, Solution, solve

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")
OVERRIDE_CHOICES = ("replicate", "shard")
OUTSIDE_LAYERS = "(outside the layers)"   # e.g. a vocab-parallel embedding's all-reduce


def layer_of(path: str) -> str:
    """The repeated block a module belongs to ('model.layers.3.mlp.up' -> 'model.layers.3')."""
    m = _LAYER.match(path)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class PlanEntry:
    module: str
    parameter: str
    placement: str          # column | row | replicate
    shard: str              # e.g. "Shard(0): 2 parts"
    why: str
    collectives: str
    full_numel: int
    local_numel: int


@dataclass
class Plan:
    """Decisions for one model at one world size."""

    model_name: str
    world_size: int
    entries: list[PlanEntry]
    all_reduces: dict[str, int]                 # layer -> all-reduces in the forward pass
    all_reduce_sites: list[tuple[str, str]]     # (after module, value node)
    replicated: dict[str, str]                  # module -> reason
    not_divisible: list[Reason]
    overrides: dict[str, str] = field(default_factory=dict)
    vocab_parallel: bool = False
    captured: Optional[Captured] = field(default=None, repr=False, compare=False)
    solution: Optional[Solution] = field(default=None, repr=False, compare=False)

    # -- queries ---------------------------------------------------------------------------
    @property
    def total_all_reduces(self) -> int:
        return sum(self.all_reduces.values())

    def placement_of(self, module: str) -> str:
        for e in self.entries:
            if e.module == module:
                return e.placement
        raise KeyError(module)

    def param_fraction(self, layers_only: bool = True) -> float:
        """Local / full parameter count of the linears (in repeated layers, by default)."""
        full = local = 0
        for e in self.entries:
            if layers_only and not layer_of(e.module):
                continue
            full += e.full_numel
            local += e.local_numel
        return local / full if full else 1.0

    # -- overrides -------------------------------------------------------------------------
    def override(self, decisions: dict[str, str]) -> "Plan":
        """A new plan with some modules forced, e.g. {"model.layers.0.mlp": "replicate"}."""
        if self.captured is None:
            raise PlanOverrideError("this plan was loaded without its captured graph; rebuild it "
                                    "with fxtp.plan(model, world_size) to override it")
        merged = dict(self.overrides)
        for module, choice in decisions.items():
            if choice not in OVERRIDE_CHOICES:
                raise PlanOverrideError(
                    f"override for {module!r} is {choice!r}; supported: {', '.join(OVERRIDE_CHOICES)}"
                    " (fxtp decides column/row placement itself: 'replicate' keeps a module "
                    "whole, 'shard' demands that it be sharded and fails if that is unsafe)")
            merged[module] = choice
        return build_plan(self.captured, self.world_size, self.model_name, merged,
                          self.vocab_parallel)

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "world_size": self.world_size,
            "entries": [e.__dict__ for e in self.entries],
            "all_reduces_per_layer": dict(self.all_reduces),
            "all_reduce_sites": [list(s) for s in self.all_reduce_sites],
            "replicated": dict(self.replicated),
            "not_divisible": [str(r) for r in self.not_divisible],
            "overrides": dict(self.overrides),
            "vocab_parallel": self.vocab_parallel,
            "param_fraction_layers": self.param_fraction(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self):
        from rich.table import Table

        t = Table(title=f"fxtp plan: {self.model_name}, world_size={self.world_size}",
                  show_lines=False)
        for col in ("module", "parameter", "placement", "why", "collectives"):
            t.add_column(col, overflow="fold")
        for e in self.entries:
            t.add_row(e.module, e.parameter.rsplit(".", 1)[-1] + f" {e.shard}", e.placement, e.why,
                      e.collectives)
        return t

    def summary_lines(self) -> list[str]:
        lines = []
        counts = sorted(set(self.all_reduces.values()))
        if self.all_reduces:
            lines.append(f"all-reduces per layer (forward): {counts if len(counts) > 1 else counts[0]}"
                         f" over {len(self.all_reduces)} layers; total {self.total_all_reduces}")
        else:
            lines.append("all-reduces: none")
        lines.append(f"local parameters of the layers' linears: {self.param_fraction():.3f} of full "
                     f"(1/{self.world_size} = {1 / self.world_size:.3f})")
        for module, why in self.replicated.items():
            lines.append(f"replicated: {module}: {why}")
        return lines

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        for line in self.summary_lines():
            console.print(line, markup=False, highlight=False)
        return console.export_text()

    def __rich__(self):
        return self.table()


class _Null:
    def write(self, *_):
        return 0

    def flush(self):
        pass


def _override_reasons(captured: Captured, linears, overrides: dict[str, str]) -> dict[str, Reason]:
    known = _module_paths(captured.gm)
    out: dict[str, Reason] = {}
    for module, choice in overrides.items():
        if module not in known:
            close = difflib.get_close_matches(module, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PlanOverrideError(f"override names module {module!r}, which is not in the model."
                                    f"{hint}")
        if choice != "replicate":
            continue
        for name, m in linears.items():
            if m.module == module or m.module.startswith(module + "."):
                out[name] = Reason(f"user override: {module} -> {choice}", name, m.module, "override")
    return out


def _check_shard_overrides(linears, sol: Solution, overrides: dict[str, str]) -> None:
    """A module the user wants sharded must be: fxtp never shards what it found unsafe."""
    for module, choice in overrides.items():
        if choice != "shard":
            continue
        inside = [n for n, m in linears.items() if m.module == module or m.module.startswith(module + ".")]
        if not inside:
            raise PlanOverrideError(f"override asks to shard {module!r}, which has no linear layer")
        for name in inside:
            if name not in sol.actions.columns and name not in sol.actions.rows:
                reason = sol.replicated.get(name)
                raise PlanOverrideError(
                    f"override asks to shard {module!r}, but {linears[name].module} cannot be "
                    f"sharded safely: {reason or 'it is not between a replicated input and a row-parallel linear'}."
                    " Remove the override or make it 'replicate'.")


def _module_paths(gm: fx.GraphModule) -> set[str]:
    paths: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            parts = n.target.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
        mp = module_path(n)
        if mp:
            parts = mp.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return paths


def build_plan(captured: Captured, world_size: int, model_name: str,
               overrides: Optional[dict[str, str]] = None, vocab_parallel: bool = False) -> Plan:
    """Solves the sharding of a captured (bias-split) graph and describes it."""
    from .patterns.linear import find_linears

    overrides = dict(overrides or {})
    linears = find_linears(captured.gm)
    sol = solve(captured.gm, world_size, linears, _override_reasons(captured, linears, overrides),
                vocab_parallel=vocab_parallel,
                replicate_modules=frozenset(m for m, c in overrides.items() if c == "replicate"))
    _check_shard_overrides(linears, sol, overrides)
    plan = describe(captured, sol, model_name, overrides)
    plan.vocab_parallel = vocab_parallel
    return plan


def _partial_producer(nodes: dict, act, value: str) -> fx.Node:
    """The op that made a partial sum (a row-parallel linear, a vocab-parallel lookup), found by
    walking back through the ops it flowed through; all-reduces are attributed to its layer."""
    from .sharding import Partial

    node = nodes[value]
    while (node.name not in act.rows and node.name not in act.vocab_embeddings
           and isinstance(act.placements.get(node.name), Partial)):
        partial_args = [a for a in node.all_input_nodes
                        if isinstance(act.placements.get(a.name), Partial)]
        if not partial_args:
            break
        node = partial_args[0]
    return node


def describe(captured: Captured, sol: Solution, model_name: str, overrides: dict[str, str]) -> Plan:
    act, linears, ws = sol.actions, sol.linears, sol.world_size
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    comp_of = {}
    for comp in sol.components:
        for s in comp:
            comp_of[s] = comp
    attention_regions = set()
    for name, region in act.regions.items():
        if nodes[name].target in _SDPA or nodes[name].target in _SOFTMAX:
            attention_regions |= {comp_of.get(s, frozenset({s})) for s in region}

    def region_kind(comp) -> str:
        return "attention heads" if comp in attention_regions else "MLP features"

    sinks_of: dict[frozenset, list[str]] = {}
    sources_of_row: dict[str, list[str]] = {}
    for row in act.rows:
        region = act.regions.get(row, frozenset())
        for comp in {comp_of.get(s, frozenset({s})) for s in region}:
            sinks_of.setdefault(comp, []).append(linears[row].module)
        sources_of_row[row] = sorted(linears[s].module for s in region)

    sites = []
    per_layer: dict[str, int] = {}
    for value in act.reduces:
        mod = module_path(_partial_producer(nodes, act, value))
        sites.append((mod, value))
        layer = layer_of(mod) or OUTSIDE_LAYERS
        per_layer[layer] = per_layer.get(layer, 0) + 1
    entries = []
    replicated = {}
    not_div = []
    gathered = {v for v, _, _ in act.gathers}
    for name, spec in act.vocab_embeddings.items():
        w = nodes[name].args[0]
        owner = w.target.rsplit(".", 1)[0]
        numel = int(w.meta["val"].numel())
        entries.append(PlanEntry(owner, w.target, "vocab", f"Shard(0): {spec.describe()}",
                                 "vocab-parallel lookup: ids outside this rank's rows are masked",
                                 "all_reduce(sum) of the lookup" if ws > 1 else "none", numel,
                                 numel * spec.local_size // spec.size))
    for name, reason in sol.embedding_reasons.items():
        replicated[reason.module] = str(reason)
    for name, m in linears.items():
        numel = m.numel or m.out_features * m.in_features
        if name in act.columns:
            spec = act.columns[name]
            comp = comp_of.get(name, frozenset({name}))
            sinks = sorted(set(sinks_of.get(comp, [])))
            why = f"column-parallel: its {region_kind(comp)} feed {', '.join(sinks) or 'a row-parallel linear'}"
            collective = "none (input replicated)"
            if any(act.regions.get(v, frozenset()) >= {name} for v in gathered):
                why = "column-parallel output projection (vocab_parallel): its output is a model output"
                collective = "all_gather of the output" if ws > 1 else "none"
            entries.append(PlanEntry(m.module, m.weight, "column", f"Shard({m.out_dim}): {spec.describe()}",
                                     why, collective, numel, numel * spec.local_size // spec.size))
        elif name in act.rows:
            spec = act.rows[name]
            ar = "all_reduce(sum) of the output" if ws > 1 else "none (world_size=1)"
            why = f"row-parallel: its input is sharded by {', '.join(sources_of_row.get(name, []))}"
            entries.append(PlanEntry(m.module, m.weight, "row", f"Shard({m.in_dim}): {spec.describe()}",
                                     why, ar, numel, numel * spec.local_size // spec.size))
        else:
            reason = sol.replicated.get(name)
            text = str(reason) if reason else "not between a replicated input and a row-parallel linear"
            if reason is not None and reason.kind == "not_divisible":
                if not reason.module:   # failed outside any submodule: name the linear instead
                    reason = replace(reason, module=m.module)
                if reason not in not_div:
                    not_div.append(reason)
            replicated[m.module] = text
            entries.append(PlanEntry(m.module, m.weight, "replicate", "Replicate()", text, "none",
                                     numel, numel))
    if ws == 1:
        per_layer = {}
        sites = []
    return Plan(model_name=model_name, world_size=ws, entries=entries, all_reduces=per_layer,
                all_reduce_sites=sites, replicated=replicated, not_divisible=not_div,
                overrides=overrides, captured=captured, solution=sol)
