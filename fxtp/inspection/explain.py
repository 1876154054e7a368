"""fxtp.explain and fxtp.diff: what the rewrite did to a graph, layer by layer.

`explain(tp)` reads the record the passes left in `tp.meta["fxtp"]` and the rewritten graph's
node metadata: which parameters were sliced (full -> local shape), which size constants were
rewritten (old -> new), where each collective sits, what it sums and which ops wait for it.
`diff(tp, layer)` shows the captured graph and the rewritten one for one layer as a unified
diff of node lines, so that a user chasing a mismatch sees exactly what changed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx

from ..capture.linear import module_path
from ..errors import NotTransformedError, UnknownLayerError
from ..planning.plan import OUTSIDE_LAYERS, layer_of
from ..rewrite.collectives import COLLECTIVE_META
from ..rewrite.local_slices import NARROW_META
from ..rewrite.record import META_KEY
from ..solve.sequence import partial_producer


@dataclass
class LayerExplanation:
    """What fxtp changed inside one repeated block (or outside them)."""

    layer: str
    sharded: list[tuple[str, tuple, tuple]] = field(default_factory=list)    # param, full, local
    constants: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # node, op, old, new
    collectives: list[dict[str, Any]] = field(default_factory=list)
    narrows: list[str] = field(default_factory=list)           # slice nodes of replicated inputs
    grad_syncs: list[str] = field(default_factory=list)        # Megatron f / replica sums


@dataclass
class Explanation:
    model_name: str
    rank: int
    world_size: int
    layers: dict[str, LayerExplanation]

    @property
    def all_reduces(self) -> dict[str, int]:
        return {name: sum(1 for c in lay.collectives if c["op"] == "all_reduce")
                for name, lay in self.layers.items()
                if any(c["op"] == "all_reduce" for c in lay.collectives)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_name, "rank": self.rank, "world_size": self.world_size,
                "layers": {k: {"sharded": [list(map(str, s)) for s in v.sharded],
                               "constants": [list(map(str, c)) for c in v.constants],
                               "collectives": v.collectives, "narrows": v.narrows,
                               "grad_syncs": v.grad_syncs} for k, v in self.layers.items()}}

    def __str__(self) -> str:
        out = [f"fxtp explain: {self.model_name}, rank {self.rank} of {self.world_size}"]
        for name, lay in self.layers.items():
            n_ar = sum(1 for c in lay.collectives if c["op"] == "all_reduce")
            seq = [sum(1 for c in lay.collectives if c["op"] == op)
                   for op in ("reduce_scatter", "all_gather")]
            out.append(f"\n[{name}]  {len(lay.sharded)} sharded parameters, "
                       f"{len(lay.constants)} rewritten constants, {n_ar} all-reduce(s)"
                       + (f", {seq[0]} reduce-scatter(s), {seq[1]} all-gather(s)"
                          if any(seq) else ""))
            for p, full, local in lay.sharded:
                out.append(f"  shard     {p}: {list(full)} -> {list(local)}")
            for node, op, old, new in lay.constants:
                out.append(f"  constant  {node} ({op}): {old} -> {new}")
            for c in lay.collectives:
                users = ", ".join(c["users"]) or "-"
                out.append(f"  {c['op']:<9} {c['node']}: {c['why']}; read by {users}")
            if lay.narrows:
                out.append(f"  narrow    {', '.join(lay.narrows)} (this rank's slice of a "
                           "replicated value, no communication)")
            if lay.grad_syncs:
                out.append(f"  backward  {', '.join(lay.grad_syncs)} (gradient sums for training)")
        return "\n".join(out)


def _info(tp: fx.GraphModule):
    info = getattr(tp, "meta", {}).get(META_KEY)
    if info is None:
        raise NotTransformedError(
            f"{type(tp).__name__} is not a graph made by fxtp.transform (no "
            f"tp.meta[{META_KEY!r}]); pass the result of fxtp.transform(model, ws)")
    return info


def _layer(path: str) -> str:
    return layer_of(path) or OUTSIDE_LAYERS


def explain(tp: fx.GraphModule, layer: Optional[str] = None) -> Explanation:
    """Per layer of `tp` (one layer if `layer` names it): sliced parameters, rewritten
    constants, collectives (what they sum, why, who reads the result), narrows, grad syncs."""
    info = _info(tp)
    plan = info.plan
    layers: dict[str, LayerExplanation] = {}

    def at(path: str) -> LayerExplanation:
        key = _layer(path)
        return layers.setdefault(key, LayerExplanation(key))

    for name, (full, local) in info.sharded_params.items():
        at(name.rsplit(".", 1)[0]).sharded.append((name, full, local))
    nodes = {n.name: n for n in tp.graph.nodes}
    captured = {n.name: n for n in plan.captured.gm.graph.nodes} if plan.captured else {}
    for node_name, old, new in info.rewritten_constants:
        n = nodes.get(node_name) or captured.get(node_name)
        path = module_path(n) if n is not None else ""
        op = str(getattr(n, "target", "?")).replace("aten.", "")
        at(path).constants.append((node_name, op, old, new))
    act = plan.solution.actions if plan.solution else None
    for n in tp.graph.nodes:
        meta = n.meta.get(COLLECTIVE_META)
        if meta is not None:
            of = meta.get("of", "")
            producer = None
            if act is not None and of in captured:
                try:
                    producer = partial_producer(captured, act, of)
                except (KeyError, AttributeError):
                    producer = None
            op = meta.get("op")
            src = (module_path(producer) if producer is not None and op in ("all_reduce",
                   "reduce_scatter") else module_path(n))
            why = {"all_reduce": f"sums the partial sum of row-parallel {src}",
                   "reduce_scatter": f"sums the partial sum of row-parallel {src}, each rank "
                                     "keeping its tokens (sequence parallel)",
                   "all_gather": f"gathers the whole sequence of {of} for readers that need "
                                 "it (sequence parallel)",
                   "scatter": f"keeps this rank's tokens of {of}, no communication "
                              "(sequence parallel)"}.get(op, f"gathers the sharded output of {src}")
            at(src).collectives.append(
                {"op": meta.get("op", "collective"), "node": n.name, "of": of, "why": why,
                 "users": [u.name for u in n.users]})
        elif n.meta.get(NARROW_META) is not None and n.target is not None:
            at(module_path(n)).narrows.append(n.name)
    for name in info.grad_sync_nodes:
        n = nodes.get(name)
        if n is not None:
            at(module_path(n)).grad_syncs.append(name)
    if layer is not None:
        if layer not in layers:
            raise UnknownLayerError(f"fxtp.explain: no layer {layer!r} changed; layers: {sorted(layers)}")
        layers = {layer: layers[layer]}
    order = sorted(layers, key=_layer_sort_key)
    return Explanation(plan.model_name, info.rank, info.world_size, {k: layers[k] for k in order})


def _layer_sort_key(name: str):
    import re

    parts = re.split(r"(\d+)", name)
    return (name == OUTSIDE_LAYERS, [int(p) if p.isdigit() else p for p in parts])


def graph_layers(gm: fx.GraphModule) -> list[str]:
    """The repeated blocks the ops of `gm` belong to, in model order."""
    return sorted({_layer(module_path(n)) for n in gm.graph.nodes if n.op == "call_function"}
                  - {OUTSIDE_LAYERS}, key=_layer_sort_key)


def _layer_lines(gm: fx.GraphModule, layer: str) -> list[str]:
    return [n.format_node() or n.name for n in gm.graph.nodes
            if n.op == "call_function" and _layer(module_path(n)) == layer]


def diff(tp: fx.GraphModule, layer: Optional[str] = None) -> str:
    """The captured graph vs the rewritten one for `layer` (default: the first layer), as a
    unified diff of node lines: sliced weights, rewritten sizes and inserted collectives show
    as changed or added lines."""
    info = _info(tp)
    if info.plan.captured is None:
        raise NotTransformedError("fxtp.diff: the plan has no captured graph to compare with")
    before = info.plan.captured.gm
    if layer is None:
        layers = graph_layers(tp)
        layer = layers[0] if layers else OUTSIDE_LAYERS
    old, new = _layer_lines(before, layer), _layer_lines(tp, layer)
    if not old and not new:
        raise UnknownLayerError(f"fxtp.diff: no op belongs to layer {layer!r}")
    return "\n".join(difflib.unified_diff(old, new, f"captured {layer}",
                                          f"rank {info.rank} of {info.world_size}: {layer}",
                                          lineterm="", n=1))
