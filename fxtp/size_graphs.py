"""Graphs for input sizes the capture did not hold for.

torch.export records the conditions on input sizes a model's code branched on (Bamba's scan
pads a sequence that does not fill its chunks: `if pad_size > 0`; a window taken only from
longer inputs). The graph holds for sizes that meet them. A call whose inputs break one gets a
graph of its own: captured again from `tp`'s weightless skeleton with these inputs' shapes (as
fake tensors on `tp`'s device, so that device checks in the model's code answer as they will
at run time: capture/on_device.py), planned with `tp`'s overrides (the modules `tp` keeps
whole kept whole), rewritten, and run on `tp`'s own tensors (`SharedTensors`: no copy of the
weights; the plan must slice every tensor as `tp`'s does).

    tp(input_ids=ids_of_32)      # breaks `pad_size > 0`: builds a second graph, runs it
    tp.size_graphs               # <size graphs: 1 of at most 4, built for ...>

Built at the first call of such a size (seconds), on every rank (the ranks are given the same
inputs), and kept: later calls take the first graph whose conditions they meet. At most
`MAX_GRAPHS` are kept; a new one then replaces the least recently used, with a warning.
Where no graph can be built (no skeleton, LoRA folded into the weights), the call raises
`InputError` quoting the broken condition, before any rank reaches a collective.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ._transform import transform
from .capture.export import Captured, capture, model_device
from .capture.linear import split_biases
from .capture.on_device import faked_on, unfake
from .errors import FxtpError, InputError
from .guards import recorded_conditions
from .modes import is_folded
from .planning.describe import build_plan
from .planning.overrides import module_paths
from .planning.plan import Plan
from .planning.planner import model_name
from .rewrite.record import META_KEY
from .runtime.group import named_group
from .shared_tensors import SharedTensors

MAX_GRAPHS = 4
_building = 0       # > 0 while a size graph is transformed: that transform attaches nothing


def attach(tp: fx.GraphModule) -> None:
    """Gives `tp` (just made by `fxtp.transform`) its `size_graphs` when its capture recorded
    conditions on input sizes, and a forward that runs the graph a call was routed to (by the
    input hook, `guards.install_input_defaults`). Graphs without such conditions (ranges of
    sizes: the equalities say which inputs match, not which path the code took) are left as
    they are."""
    if _building or not tp.meta[META_KEY].plan.conditions or recorded_conditions(tp) is None:
        return
    tp.size_graphs = SizeGraphs(tp)
    ref = weakref.ref(tp)       # no cycle: tp owns the forward

    def forward(*args, **kwargs):
        gm = ref()
        route, gm.size_graphs.route = gm.size_graphs.route, None
        if route is not None:
            return route(*args, **kwargs)
        return type(gm).forward(gm, *args, **kwargs)     # the graph's code, as recompiled

    tp.forward = forward


class SizeGraphs:
    """`tp.size_graphs`: the graphs built so far for sizes `tp`'s own graph does not hold for
    (`graphs`, with the input shapes each was built for in `built`)."""

    def __init__(self, tp: fx.GraphModule):
        self._tp = weakref.ref(tp)
        self.graphs: list[tuple[fx.GraphModule, SharedTensors, Any]] = []
        self.built: list[str] = []
        self.route: Optional[fx.GraphModule] = None    # the graph of the call under way

    def __repr__(self) -> str:
        shown = "; ".join(self.built) or "none yet"
        return f"<size graphs: {len(self.graphs)} of at most {MAX_GRAPHS}, built for {shown}>"

    def choose(self, args: tuple, kwargs: dict, broken: InputError) -> None:
        """Routes this call to a graph whose conditions these inputs meet, building one if
        none does (dropping the least recently used past `MAX_GRAPHS`); raises `broken` (with
        why) when it cannot."""
        tp = self._tp()
        for i, (graph, shared, conditions) in enumerate(self.graphs):
            try:
                conditions(graph, args, kwargs)
            except InputError:
                continue
            self.graphs.append(self.graphs.pop(i))      # the most recently used last
            self.built.append(self.built.pop(i))
            shared.bind(tp, _replaced)
            self.route = graph
            return
        why = self._cannot_build(tp)
        if why:
            raise InputError(f"{broken} ({why})") from broken
        graph = self._build(tp, args, kwargs, broken)
        conditions = recorded_conditions(graph) or _always
        shared = SharedTensors.match(tp, graph, set(), _refuse(broken))
        shared.bind(tp, _replaced)
        if len(self.graphs) >= MAX_GRAPHS:
            warnings.warn(
                f"fxtp: {MAX_GRAPHS} graphs for other input sizes are kept, the most fxtp "
                f"keeps: the least recently used one (built for {self.built[0]}) is dropped "
                f"for {_shapes(args, kwargs)}. Calls that cycle through more size classes "
                "than that build a graph again each time (seconds); pad the inputs to fewer "
                "sizes.", stacklevel=4)
            del self.graphs[0], self.built[0]
        self.graphs.append((graph, shared, conditions))
        self.built.append(_shapes(args, kwargs))
        self.route = graph

    def _cannot_build(self, tp: fx.GraphModule) -> str:
        info = tp.meta[META_KEY]
        if info.skeleton is None:
            return f"no other graph can be built: {info.skeleton_error}"
        if is_folded(tp):
            return ("no other graph is built while LoRA is folded into the weights: "
                    "fxtp.unfold_lora(tp) first")
        return ""

    @staticmethod
    def _build(tp: fx.GraphModule, args: tuple, kwargs: dict,
               broken: InputError) -> fx.GraphModule:
        """Captures, plans (with `tp`'s overrides, and its whole modules kept whole) and
        rewrites the skeleton for these inputs' shapes, faked on tp's device. Sizes the capture
        fixes stay fixed (torch.export fixes a size of 1), and the graph's own guards refuse
        other sizes: a graph captured at 2 would also serve 1, but without the guard on a
        branch the model's code takes for 1 only (`if batch == 1`), which would then be a
        silent wrong answer."""
        global _building
        info = tp.meta[META_KEY]
        example = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
            (tuple(args), dict(kwargs)))
        group = named_group(info.group_name)
        skel = info.skeleton
        _building += 1
        try:
            with faked_on(skel, example, model_device(tp)) as on_tp_device:
                captured = capture(skel, on_tp_device, keep_fixed=True)
            unfake(captured.gm, skel)
            split_biases(captured.gm)
            plan = build_plan(captured, info.world_size, model_name(skel),
                              _kept_whole(info.plan, captured), info.plan.vocab_parallel,
                              info.plan.sequence_parallel)
            # its weights are tp's (checked by tp's transform or load): no weight check
            graph = transform(skel, info.world_size, plan=plan, group=group,
                              check_weights=False)
        except FxtpError as e:
            raise InputError(f"{broken}; fxtp could not build a graph for these sizes: "
                             f"{e}") from e
        except Exception as e:  # noqa: BLE001 - e.g. the capture reads values meta lacks
            raise InputError(f"{broken}; fxtp could not build a graph for these sizes from "
                             f"the weightless skeleton ({type(e).__name__}: {e})") from e
        finally:
            _building -= 1
        graph.eval()
        graph.meta[META_KEY].state.check_inputs = False    # tp's hook checked them already
        return graph


def _kept_whole(plan: Plan, captured: Captured) -> dict[str, str]:
    """tp's overrides, and `replicate` for each module tp's plan keeps whole that this capture
    also runs: these sizes may take a path through it that could be sharded (DeepSeek-V4's
    compressor, for inputs shorter than its window), and its slices would then differ from
    tp's. A module tp shards that this plan cannot shard is still refused at binding."""
    whole = ({e.module for e in plan.entries if e.placement == "replicate"}
             - {e.module for e in plan.entries if e.placement != "replicate"})
    known = module_paths(captured.gm)
    return {**dict.fromkeys(sorted(m for m in whole if m in known), "replicate"),
            **plan.overrides}


def _shapes(args: tuple, kwargs: dict) -> str:
    shapes = [f"{k} {list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    shapes = [f"{list(a.shape)}" for a in args if isinstance(a, torch.Tensor)] + shapes
    return ", ".join(shapes)


def _always(graph: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """The conditions of a graph that recorded none: every size meets them."""


def _refuse(broken: InputError):
    def refuse(problems: list[str]):
        raise InputError(f"{broken}; the graph built for these sizes cannot run on tp's "
                         f"tensors ({'; '.join(problems[:5])})")
    return refuse


def _replaced(name: str, what: str):
    raise InputError(f"fxtp: tp's {name} is {what}, not the shape the graph for these input "
                     "sizes was built for; something replaced it")
