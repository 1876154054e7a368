"""Turns a solved graph into a Plan: an entry per linear with its reason, the all-reduces per layer,
and the bytes each rank keeps.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch import fx

from ..capture.export import Captured
from ..capture.linear import find_linears, module_path, tensor_key
from ..graph.nodes import get_arg, get_tensor_attr, nodes_by_name
from ..graph.ops import SDPA, SOFTMAX, aten
from ..solve.records import ReasonKind, Solution
from ..solve.sequence import bytes_per_token, partial_producer
from ..solve.sequence import decide as decide_sequence
from ..solve.solver import sliced_in_place, solve
from .overrides import check_overrides, check_shard_overrides, override_reasons
from .plan import OUTSIDE_LAYERS, Plan, PlanEntry, PlanSource, layer_of
from .sequence_summary import summarise


def build_plan(captured: Captured, world_size: int, model_name: str,
               overrides: Optional[dict[str, str]] = None, vocab_parallel: bool = False,
               sequence_parallel: bool = False) -> Plan:
    """Solves the sharding of a captured (bias-split) graph and describes it; with
    `sequence_parallel`, the replicated region between the layers then holds 1/N of the
    tokens per rank (solve/sequence.py)."""
    overrides = check_overrides(overrides)
    linears = find_linears(captured.gm)
    reasons = override_reasons(captured, linears, overrides)
    replicated = frozenset(m for m, c in overrides.items() if c == "replicate")

    def solved(partial_statistics: bool):
        sol = solve(captured.gm, world_size, linears, reasons, vocab_parallel=vocab_parallel,
                    replicate_modules=replicated, partial_statistics=partial_statistics)
        return decide_sequence(captured.gm, sol) if sequence_parallel and world_size > 1 else sol

    sol = solved(True)
    check_shard_overrides(linears, sol, overrides)
    plan = describe(captured, sol, model_name, overrides)
    if plan.statistics:
        # the other choice: those norms' regions kept whole, no statistic all-reduced
        plan = choose_statistics(plan, describe(captured, solved(False), model_name, overrides))
    plan.vocab_parallel = vocab_parallel
    plan.sequence_parallel = sequence_parallel
    return plan


def choose_statistics(with_: Plan, without: Plan) -> Plan:
    """Of a plan using partial statistics and the plan keeping their regions whole, the one
    whose ranks hold fewer parameter bytes (a statistic is a collective worth paying only for
    sharded weights); it records both costs and keeps the other plan as `alternative`."""
    costs = {"with": [with_.all_reduced_bytes_per_token, max(with_.local_param_bytes)],
             "without": [without.all_reduced_bytes_per_token, max(without.local_param_bytes)]}
    chosen, other = ((without, with_) if costs["without"][1] <= costs["with"][1]
                     else (with_, without))
    chosen.statistics_costs = {**costs, "chosen": "with" if chosen is with_ else "without"}
    chosen.alternative = other
    return chosen


def _replan(plan: Plan, world_size: int, overrides: dict[str, str], vocab_parallel: bool,
            sequence_parallel: bool = False) -> Plan:
    """`Plan.override`/`replan` of a plan solved from a whole capture."""
    return build_plan(plan.captured, world_size, plan.model_name, overrides, vocab_parallel,
                      sequence_parallel)


def describe(captured: Captured, sol: Solution, model_name: str, overrides: dict[str, str]) -> Plan:
    act, linears, ws = sol.actions, sol.linears, sol.world_size
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    comp_of = {}
    for comp in sol.components:
        for s in comp:
            comp_of[s] = comp
    attention_regions = set()
    for name, region in act.regions.items():
        if nodes[name].target in SDPA or nodes[name].target in SOFTMAX:
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

    seq = summarise(captured.gm, act)
    sites = []
    per_layer: dict[str, int] = {}
    statistics: list[str] = []
    order = {name: i for i, name in enumerate(nodes)}
    for value in sorted([*act.reduces, *act.norm_statistics], key=order.__getitem__):
        producer = (nodes[value] if value in act.norm_statistics
                    else partial_producer(nodes, act, value))
        mod = module_path(producer)
        sites.append((mod, value))
        layer = layer_of(mod) or OUTSIDE_LAYERS
        per_layer[layer] = per_layer.get(layer, 0) + 1
        if producer.name in act.statistics and (mod or producer.name) not in statistics:
            statistics.append(mod or producer.name)
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
                                 "all_reduce(sum) of the lookup" if ws > 1 else "none",
                                 *_sizes(captured.gm, w.target, numel, spec, ws)))
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
            if name in seq.gathered_columns:
                collective = "all_gather of the input along the sequence (sequence parallel)"
            if any(act.regions.get(v, frozenset()) >= {name} for v in gathered):
                why = "column-parallel output projection (vocab_parallel): its output is a model output"
                collective = "all_gather of the output" if ws > 1 else "none"
            entries.append(PlanEntry(m.module, m.weight, "column", f"Shard({m.out_dim}): {spec.describe()}",
                                     why, collective, *_sizes(captured.gm, m.weight, numel, spec, ws)))
        elif name in act.rows:
            spec = act.rows[name]
            ar = "all_reduce(sum) of the output" if ws > 1 else "none (world_size=1)"
            if name in seq.scattered_rows:
                ar = "reduce_scatter(sum) of the output along the sequence (sequence parallel)"
            why = f"row-parallel: its input is sharded by {', '.join(sources_of_row.get(name, []))}"
            entries.append(PlanEntry(m.module, m.weight, "row", f"Shard({m.in_dim}): {spec.describe()}",
                                     why, ar, *_sizes(captured.gm, m.weight, numel, spec, ws)))
        else:
            reason = sol.replicated.get(name)
            text = str(reason) if reason else "not between a replicated input and a row-parallel linear"
            if reason is not None and reason.kind == ReasonKind.NOT_DIVISIBLE:
                if not reason.module:   # failed outside any submodule: name the linear instead
                    reason = replace(reason, module=m.module)
                if reason not in not_div:
                    not_div.append(reason)
            replicated[m.module] = text
            entries.append(PlanEntry(m.module, m.weight, "replicate", "Replicate()", text, "none",
                                     *_sizes(captured.gm, m.weight, numel, None, ws)))
    if ws == 1:
        per_layer = {}
        sites = []
    full_bytes, local_bytes, shares = _param_bytes(captured.gm, entries, act, ws)
    return Plan(model_name=model_name, world_size=ws, entries=entries, all_reduces=per_layer,
                all_reduce_sites=sites, replicated=replicated, not_divisible=not_div,
                overrides=overrides, full_param_bytes=full_bytes, local_param_bytes=local_bytes,
                param_shares=shares, statistics=statistics, opaque=dict(captured.opaque),
                conditions=list(captured.conditions),
                site_bytes={**seq.value_bytes,
                            **{v: _bytes_per_token(nodes[v], act.norm_statistics) for _, v in sites}},
                sequence_sites=seq.sites, sequence_kept=seq.kept, sequence_ops=seq.ops,
                live=PlanSource(captured, sol, _replan))


def _bytes_per_token(value: fx.Node, norm_statistics: dict[str, int]) -> int:
    """Bytes an all-reduce of `value` moves per token: its static dims (the dynamic ones are
    batch and sequence) times the element size; for a norm's statistic, its fp32 sums (of the
    features and their squares for a LayerNorm, of the squares for an RMSNorm or an L2 norm)."""
    if value.name in norm_statistics:
        return 4 * (2 if value.target == aten.layer_norm.default else 1)
    return bytes_per_token(value.meta.get("val"))


def _sizes(gm: fx.GraphModule, weight: str, numel: int, spec, ws: int) -> tuple:
    """(full numel, rank 0's numel, every rank's numel, itemsize) of a parameter split by
    `spec` (None: replicated)."""
    itemsize = get_tensor_attr(gm, weight).element_size()
    numels = (tuple(numel * spec.local_size_of(r) // spec.size for r in range(ws)) if spec
              else (numel,) * ws)
    return numel, numels[0], numels, itemsize


def _param_bytes(gm: fx.GraphModule, entries: list[PlanEntry], act, ws: int
                 ) -> tuple[int, tuple, dict]:
    """Bytes of every parameter (a tied tensor once) and what each rank keeps of them: the
    split weights of the entries, and the parameters sliced where they meet a sharded value
    (column-parallel biases, per-head constants: `rewrite/local_slices` slices those in place)."""
    split = {tensor_key(gm, e.parameter): e.local_numels or (e.local_numel,) for e in entries
             if e.placement != "replicate"}
    nodes = nodes_by_name(gm)
    for user, path, dim, have, want in act.narrows:
        value = get_arg(nodes[user], path)
        if sliced_in_place(value, have, want):
            t = value.meta.get("val")
            if t is not None and dim < t.dim():
                per_row = t.numel() // t.shape[dim]
                split.setdefault(tensor_key(gm, value.target),
                                 tuple(per_row * want.local_size_of(r) for r in range(ws)))
    full, local = 0, [0] * ws
    for _, p in gm.named_parameters():
        full += p.numel() * p.element_size()
        numels = split.get(id(p))
        for r in range(ws):
            local[r] += (numels[r] if numels else p.numel()) * p.element_size()
    shares = {name: split[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)
              if id(p) in split}
    return full, tuple(local), shares
