"""Points the devices baked into a graph at the device its tensors are on.

torch.export records the device of every factory call and device cast it traces
(`arange(..., device=cpu)`, `to(x, device=cpu)`), so a graph captured on one device runs on
no other. After `fxtp.load(..., device=)` (a graph captured on meta) or `tp.to(device)`:

    before:  %arange = aten.arange.default(%s, device=meta)
    after:   %arange = aten.arange.default(%s, device=cuda:1)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx


def _replace(a: Any, device: torch.device) -> Any:
    if isinstance(a, torch.device):
        return device
    if isinstance(a, (list, tuple)):
        return type(a)(_replace(x, device) for x in a)
    if isinstance(a, dict):
        return {k: _replace(v, device) for k, v in a.items()}
    return a


def resolve_device(device: "torch.device | str") -> torch.device:
    """`device` as a torch.device, a bare "cuda" being the current CUDA device (what a graph's
    device arguments must name for its tensors to match them)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def graph_devices(gm: fx.GraphModule) -> set[torch.device]:
    """The devices named by the graph's node arguments."""
    found: set[torch.device] = set()

    def visit(a: Any) -> None:
        if isinstance(a, torch.device):
            found.add(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    for g in graph_modules(gm):
        for n in g.graph.nodes:
            visit(n.args)
            visit(n.kwargs)
    return found


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """`gm` and the graphs nested in it: the bodies of higher-order ops (transformers 5.15's
    rotary embedding runs under `wrap_with_set_grad_enabled(False, submod, ...)`), which hold
    device arguments of their own."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> bool:
    """Every device argument of the graph, nested graphs included, becomes `device` (a
    tensor-parallel graph computes on one device); recompiles what changed and says whether
    anything did."""
    changed = False
    for g in graph_modules(gm):
        here = False
        for n in g.graph.nodes:
            args, kwargs = _replace(n.args, device), _replace(n.kwargs, device)
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs, here = args, kwargs, True
        if here:
            g.recompile()
            changed = True
    return changed
