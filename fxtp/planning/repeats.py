"""Plan a deep model from a capture of a few of its layers.

Capturing is the slow step of planning (torch.export traces every op of every layer with
symbolic shapes: about a second per layer here), and a transformer repeats one layer N times.
So `fxtp.plan` captures a *probe*: the model with each repeated `ModuleList` cut to its first
entries, solves that graph, checks from the graph that the probe's last two repeated layers
are the same (the same ops on the same shapes, the same decisions), and writes the last
layer's decisions for every other layer. Planning time then hardly depends on depth.

Which entries repeat is read from the modules, never from their names: a `ModuleList` whose
entries have the same module tree (classes, parameter and buffer shapes and dtypes, plain
attribute values; an int attribute equal to the entry's own index, such as `layer_idx`, is
not a difference). Entry 0 may differ from the rest (T5's first block owns the relative
position bias); then the probe keeps 3 entries. Lists nested inside a repeated entry stay
whole (experts routed by index must not be cut).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import torch
from torch import fx, nn

from ..capture.linear import module_path
from .describe import choose_statistics
from .plan import PlanEntry

MIN_ENTRIES = 4          # fewer: capturing them all costs no more than the probe


@dataclass(frozen=True)
class Repeat:
    """A ModuleList at `path` with `count` entries, of which the probe keeps `keep`."""
    path: str
    count: int
    keep: int

    def probe_index(self, i: int) -> int:
        """The probe entry whose decisions entry `i` takes."""
        return i if i < self.keep else self.keep - 1


def _signature(module: nn.Module) -> tuple:
    """The module tree of one entry, as far as it can change the graph."""
    out = []
    for name, m in module.named_modules():
        attrs = tuple((k, v) for k, v in sorted(vars(m).items())
                      if not k.startswith("_") and k != "training"
                      and (v is None or isinstance(v, (bool, int, float, str))))
        params = tuple((k, tuple(p.shape), p.dtype, p.requires_grad)
                       for k, p in m.named_parameters(recurse=False))
        buffers = tuple((k, tuple(b.shape), b.dtype) for k, b in m.named_buffers(recurse=False)
                        if b is not None)
        out.append((name, type(m).__qualname__, params, buffers, attrs))
    return tuple(out)


def _same(a: tuple, i: int, b: tuple, j: int) -> bool:
    """Entries i and j have the same tree; an int attribute may differ only by holding each
    entry's own index (`layer_idx`)."""
    if len(a) != len(b):
        return False
    for (na, ca, pa, ba, aa), (nb, cb, pb, bb, ab) in zip(a, b):
        if (na, ca, pa, ba) != (nb, cb, pb, bb) or [k for k, _ in aa] != [k for k, _ in ab]:
            return False
        for (_, va), (_, vb) in zip(aa, ab):
            if va != vb and not (type(va) is int and type(vb) is int and va == i and vb == j):
                return False
    return True


def find_repeats(model: nn.Module) -> list[Repeat]:
    """Outermost ModuleLists of at least MIN_ENTRIES structurally identical entries (all of
    them, or all but the first)."""
    found: list[Repeat] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < MIN_ENTRIES:
            continue
        if any(path.startswith(r.path + ".") for r in found):
            continue
        sigs = [_signature(m) for m in mod]
        if all(_same(s, i, sigs[1], 1) for i, s in enumerate(sigs)):
            found.append(Repeat(path, len(mod), 2))
        elif all(_same(s, i, sigs[1], 1) for i, s in enumerate(sigs[1:], start=1)):
            found.append(Repeat(path, len(mod), 3))
    return found


@contextlib.contextmanager
def probe(model: nn.Module, repeats: list[Repeat]) -> Iterator[None]:
    """The model with each repeated list cut to its probe entries, restored afterwards."""
    saved = []
    try:
        for r in repeats:
            parent_path, _, attr = r.path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            full = getattr(parent, attr)
            saved.append((parent, attr, full))
            setattr(parent, attr, nn.ModuleList(list(full)[:r.keep]))
        yield
    finally:
        for parent, attr, full in reversed(saved):
            setattr(parent, attr, full)


# ---------------------------------------------------------------------------------------------
# the graph check: the probe's last two entries are the same layer

def _layer_ops(gm: fx.GraphModule, prefix: str) -> list[tuple]:
    """The ops of one layer in graph order, with node references made relative and the
    layer's own prefix removed from parameter names."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and (module_path(n) + ".").startswith(prefix)]
    index = {n: i for i, n in enumerate(nodes)}

    def norm(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in index:
                return ("local", index[a])
            if a.op == "get_attr" and a.target.startswith(prefix):
                return ("attr", a.target[len(prefix):])
            val = a.meta.get("val")
            return ("outside", tuple(val.shape) if isinstance(val, torch.Tensor) else str(val))
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return str(a)

    return [(str(n.target), norm(n.args), norm(n.kwargs)) for n in nodes]


def same_layers(gm: fx.GraphModule, r: Repeat) -> bool:
    a, b = f"{r.path}.{r.keep - 2}.", f"{r.path}.{r.keep - 1}."
    ops_a, ops_b = _layer_ops(gm, a), _layer_ops(gm, b)
    return bool(ops_a) and ops_a == ops_b


# ---------------------------------------------------------------------------------------------
# writing the last probe layer's decisions for every layer

def same_decisions(plan, repeats: list[Repeat]) -> bool:
    """The probe's last two layers of each repeated list got the same placements, splits and
    all-reduces: the second check (after `same_layers`) before their plan is copied."""
    for r in repeats:
        a, b = f"{r.path}.{r.keep - 2}.", f"{r.path}.{r.keep - 1}."
        da = [(e.module[len(a):], e.placement, e.shard) for e in plan.entries
              if e.module.startswith(a)]
        db = [(e.module[len(b):], e.placement, e.shard) for e in plan.entries
              if e.module.startswith(b)]
        if da != db or plan.all_reduces.get(a[:-1]) != plan.all_reduces.get(b[:-1]):
            return False
    return True


def _renamer(repeats: list[Repeat]):
    """Maps a name in layer i >= keep to the name in the probe layer it copies."""
    pats = [(r, re.compile(rf"^({re.escape(r.path)})\.(\d+)(\.|$)")) for r in repeats]

    def to_probe(name: str) -> str:
        for r, pat in pats:
            m = pat.match(name)
            if m:
                return f"{m.group(1)}.{r.probe_index(int(m.group(2)))}{m.group(3)}{name[m.end():]}"
        return name
    return to_probe


def _in_layer_order(items: list, name_of, rename, repeats: list[Repeat]) -> list:
    """`items` with those of each repeat's last probe entry copied for every later entry,
    the copies placed right after them, layer by layer (the order of a whole capture)."""
    out: list = []
    pending: list = []                  # a run of items of one repeat's last probe entry
    owner: list = [None]

    def flush() -> None:
        if pending:
            r = owner[0]
            last = f"{r.path}.{r.keep - 1}."
            for i in range(r.keep, r.count):
                def swap(text: str, i: int = i) -> str:   # the layer's names in texts
                    return (text + ".").replace(last, f"{r.path}.{i}.")[:-1]
                out.extend(rename(x, swap) for x in pending)
            pending.clear()

    for x in items:
        repeat = _owner(name_of(x) or "", repeats)
        if repeat is None or repeat is not owner[0]:
            flush()
        owner[0] = repeat
        out.append(x)
        if repeat is not None:
            pending.append(x)
    flush()
    return out


def _owner(name: str, repeats: list[Repeat]) -> Optional[Repeat]:
    """The repeat whose last probe entry holds `name`."""
    for r in repeats:
        last = f"{r.path}.{r.keep - 1}"
        if name == last or name.startswith(last + "."):
            return r
    return None


def expand_plan(plan, model: nn.Module, repeats: list[Repeat], example_inputs: Any,
                replanner):
    """The plan of the whole model from the plan of its probe; `replanner` plans it again."""
    def renamed(e: PlanEntry, swap) -> PlanEntry:
        return replace(e, module=swap(e.module), parameter=swap(e.parameter), why=swap(e.why))

    entries = _in_layer_order(plan.entries, lambda e: e.module, renamed, repeats)
    all_reduces = dict(_in_layer_order(list(plan.all_reduces.items()), lambda kv: kv[0],
                                       lambda kv, swap: (swap(kv[0]), kv[1]), repeats))
    sites = _in_layer_order(plan.all_reduce_sites, lambda mv: mv[0],
                            lambda mv, swap: (swap(mv[0]), mv[1]), repeats)
    replicated = dict(_in_layer_order(list(plan.replicated.items()), lambda kv: kv[0],
                                      lambda kv, swap: (swap(kv[0]), swap(kv[1])), repeats))
    not_div = _in_layer_order(plan.not_divisible, lambda r: r.module,
                              lambda r, swap: replace(r, module=swap(r.module),
                                                      node=swap(r.node)), repeats)
    statistics = _in_layer_order(plan.statistics, lambda m: m, lambda m, swap: swap(m), repeats)
    opaque = dict(_in_layer_order(list(plan.opaque.items()), lambda kv: kv[0],
                                  lambda kv, swap: (swap(kv[0]), kv[1]), repeats))
    seq_sites = _in_layer_order(plan.sequence_sites, lambda mvo: mvo[0],
                                lambda mvo, swap: (swap(mvo[0]), *mvo[1:]), repeats)
    seq_kept = _in_layer_order(plan.sequence_kept, lambda mw: mw[0],
                               lambda mw, swap: (swap(mw[0]), mw[1]), repeats)
    seq_ops = dict(_in_layer_order(list(plan.sequence_ops.items()), lambda kv: kv[0],
                                   lambda kv, swap: (swap(kv[0]), kv[1]), repeats))
    full, local = _model_bytes(model, plan, repeats)
    whole = replace(plan, entries=entries, all_reduces=all_reduces, all_reduce_sites=sites,
                    sequence_sites=seq_sites, sequence_kept=seq_kept, sequence_ops=seq_ops,
                    replicated=replicated, not_divisible=not_div, full_param_bytes=full,
                    local_param_bytes=local, statistics=statistics, opaque=opaque,
                    statistics_costs=None,
                    alternative=None,
                    live=replace(plan.live, probe=tuple(repeats), model=model,
                                 example_inputs=example_inputs, replanner=replanner))
    if plan.alternative is None:
        return whole
    other = expand_plan(plan.alternative, model, repeats, example_inputs, replanner)
    return choose_statistics(*((whole, other) if plan.statistics else (other, whole)))


def _model_bytes(model: nn.Module, plan, repeats: list[Repeat]) -> tuple[int, tuple]:
    """Bytes of every parameter of the whole model, and what each rank keeps, from the
    per-parameter shares of the probe plan."""
    to_probe = _renamer(repeats)
    shares = plan.param_shares or {}
    ws = plan.world_size
    full, local = 0, [0] * ws
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        full += nbytes
        share: Optional[tuple] = shares.get(to_probe(name))
        for r in range(ws):
            local[r] += share[r] * p.element_size() if share else nbytes
    return full, tuple(local)
