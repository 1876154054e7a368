"""What sequence parallelism did to a plan, in the plan's terms: its collectives by module,
the all-reduces it kept and why, the linears whose collectives changed, and bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..capture.linear import module_path
from ..graph.ops import PARTIAL_SHAPE_OPS, functional_twin
from ..solve.records import Actions
from ..solve.sequence import bytes_per_token, partial_producer
from .plan import OUTSIDE_LAYERS, layer_of


@dataclass
class SequenceSummary:
    sites: list[tuple[str, str, str]] = field(default_factory=list)   # (module, value, op)
    kept: list[tuple[str, str]] = field(default_factory=list)         # (module, why)
    ops: dict[str, int] = field(default_factory=dict)   # layer -> ops holding own tokens
    gathered_columns: set[str] = field(default_factory=set)          # linear nodes
    scattered_rows: set[str] = field(default_factory=set)
    value_bytes: dict[str, int] = field(default_factory=dict)        # value -> bytes per token


def _read_through_views(n: fx.Node) -> fx.Node:
    while (n.op == "call_function" and functional_twin(n.target) in PARTIAL_SHAPE_OPS
           and n.all_input_nodes):
        n = n.all_input_nodes[0]
    return n


def summarise(gm: fx.GraphModule, act: Actions) -> SequenceSummary:
    seq = act.sequence
    out = SequenceSummary()
    if seq is None:
        return out
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    for name in seq.dims:
        layer = layer_of(module_path(nodes[name])) or OUTSIDE_LAYERS
        out.ops[layer] = out.ops.get(layer, 0) + 1
    events = []
    for value in seq.reduce_scatters:
        producer = partial_producer(nodes, act, value)
        out.scattered_rows.add(producer.name)
        events.append((order[value], module_path(producer), value, "reduce_scatter"))
    for value in seq.scatters:
        events.append((order[value], module_path(nodes[value]), value, "scatter"))
    gathered = {g.value for g in seq.gathers}
    for g in seq.gathers:
        events.append((order[g.value], module_path(nodes[g.value]), g.value, "all_gather"))
    out.sites = [(mod, value, op) for _, mod, value, op in sorted(events)]
    for m in act.columns:
        reads = nodes[m].all_input_nodes
        if reads and _read_through_views(reads[0]).name in gathered:
            out.gathered_columns.add(m)
    for value, why in seq.kept.items():
        where = module_path(partial_producer(nodes, act, value)) if value in nodes else ""
        out.kept.append((where or value, why.text))
    out.value_bytes = {v: bytes_per_token(nodes[v].meta.get("val")) for _, v, _ in out.sites}
    return out
